"""Ultralytics' own OpenVINO export of a YOLO model: the reference a YOLO user compares us with.

`ultralytics_int8_reference` runs `YOLO(weights).export(format="openvino", quantize=8, ...)`
(`int8=True` before Ultralytics 8.4; it calibrates with NNCF on the data.yaml split it is
given, keeping the Detect head in float) and the FP32 export of the same model, offline, in a
temp folder, and measures both the way the project measures its own engines: mAP on the
project's letterboxed test split with the project's metrics (tasks/metrics/detection.py),
batch-1 latency of the compiled OpenVINO model timed in alternating blocks
(tasks/metrics/timing.py), and the IR's file size.

The exports and their runners are tasks/models/ultralytics_export.py; the dataset and the `.pt`
the export reads are written by tasks/models/ultralytics_io.py.

Ultralytics is imported only through `offline_ultralytics()`, which first switches off every
path to the network: `YOLO_OFFLINE` (its online check answers False, so no telemetry, no
update check), `YOLO_AUTOINSTALL=false` (a missing requirement is an error, never a pip
install), the integrations and `sync` settings off (in memory: the user's settings file is not
rewritten), a private settings folder, and matplotlib's DejaVu Sans registered as the
`Arial.ttf` Ultralytics' dataset check otherwise fetches (plots are off: it is never drawn).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tasks.datasets.coco import DetectionSet
from tasks.harness.errors import ConfigError, DataError
from tasks.harness.io import md5_file, write_json
from tasks.metrics.detection import Runner
from tasks.models.ultralytics_export import (
    VARIANTS,
    ReferenceCfg,
    ultralytics_exports,
    ultralytics_macs,
)
from tasks.models.ultralytics_io import to_ultralytics_pt, write_yolo_dataset
from tasks.models.ultralytics_offline import CONFIG_DIR_ENV, offline_ultralytics  # noqa: F401

log = logging.getLogger(__name__)


def ultralytics_int8_reference(
    weights_pt: Path,
    data_yaml: Path,
    manifest: dict,
    cfg: ReferenceCfg,
    work: Path | None = None,
    others: dict[str, Runner] | None = None,
) -> dict:
    """Ultralytics' OpenVINO FP32 and INT8 exports of `weights_pt`, measured like our engines.

    Both exports are made by Ultralytics (`export(format="openvino", quantize=8 or None` (the
    `int8=True/False` of Ultralytics < 8.4), `data=data_yaml, imgsz, batch=1,
    split=cfg.calibration_split, fraction)`) from a copy of the weights in a temp folder (or
    `work`); see `ultralytics_exports`. Each is fed the project's own letterboxed test images
    (DetectionSet of `manifest`'s test split at `cfg.imgsz`: the same float32 [0, 1] inputs
    the project's engines get), its raw output reduced by Ultralytics' NMS, and scored by the
    project's `predict` + `coco_metrics` against the test split.

    Latency is batch 1, timed with `tasks.metrics.timing.time_blocks` (every runner in one call:
    alternating shuffled blocks, so the figures compare as ratios): `latency_ms_p50` / `_p95`
    are the compiled model alone, without NMS; `latency_ms_p50_with_nms` / `_p95` add
    Ultralytics' torch NMS on the host at the deployment floor `cfg.timed_conf` (keeping
    `cfg.timed_max_det`), as a user of the export runs it (the project's own engines have NMS
    inside the graph: compare them with the `_with_nms` figures). mAP uses the NMS of
    Ultralytics' val (`cfg.conf`, `cfg.max_det`). `others`
    (name: a project runner, e.g. our deployed engine) are timed and scored in the same call.

    Returns:
        {"variants": {"ultralytics_openvino_fp32" | "ultralytics_openvino_int8": {map50,
        map50_95, precision, recall, latency_ms_p50, latency_ms_p95, latency_ms_p50_with_nms,
        latency_ms_p95_with_nms, throughput_ips, size_mb, macs, conv_precisions, runtime,
        inference_precision_used}}, "others": {name: {map50, map50_95, precision, recall,
        latency_ms_p50, latency_ms_p95, throughput_ips}}, "config": cfg, "versions": {...},
        "test_images": n}.
    """
    from tasks.harness.io import versions
    from tasks.metrics.detection import coco_metrics, predict
    from tasks.metrics.timing import latency_stats, time_blocks

    others = others or {}
    if clash := sorted(set(others) & {n + s for n in VARIANTS for s in ("", "+nms")}):
        raise ConfigError(f"others: {clash} are names of the Ultralytics rows; rename them")
    offline_ultralytics()
    test = DetectionSet(manifest, "test", cfg.imgsz)

    def quality(runner) -> dict:
        m = coco_metrics(test.coco, predict(runner, test, 1), cfg.score_threshold)
        return {k: m[k] for k in ("map50", "map50_95", "precision", "recall")}

    with tempfile.TemporaryDirectory(prefix="shrinkflow-ulref-") as tmp:
        exports = ultralytics_exports(weights_pt, data_yaml, cfg, Path(work or tmp))
        runners, rows = dict(others), {}
        for name, e in exports.items():
            runners[name] = e.raw_runner()
            runners[f"{name}+nms"] = e.detection_runner(timed=True)
            rows[name] = {**e.facts(), **quality(e.detection_runner())}
        x = test.batch(slice(0, 1))
        times = time_blocks(runners, x, warmup=cfg.warmup, runs=cfg.runs, rounds=cfg.rounds)
    macs = ultralytics_macs(Path(weights_pt), cfg.ultralytics_imgsz)
    for name, row in rows.items():
        model, nms = latency_stats(times[name], 1), latency_stats(times[f"{name}+nms"], 1)
        row.update(
            latency_ms_p50=model["latency_ms_p50"],
            latency_ms_p95=model["latency_ms_p95"],
            throughput_ips=model["throughput_ips"],
            latency_ms_p50_with_nms=nms["latency_ms_p50"],
            latency_ms_p95_with_nms=nms["latency_ms_p95"],
            macs=macs,
        )
    other_rows = {}
    for name, runner in others.items():
        stats = latency_stats(times[name], 1)
        other_rows[name] = {
            **quality(runner),
            **{k: stats[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_ips")},
        }
    return {
        "variants": rows,
        "others": other_rows,
        "config": cfg.model_dump(),
        "test_images": len(test),
        "versions": versions("ultralytics", "openvino", "nncf", "torch"),
    }


def bench_reference(
    checkpoint: Path,
    manifest: Path,
    out: Path,
    cfg: ReferenceCfg,
    *,
    weights_pt: Path | None = None,
    work: Path | None = None,
    others: dict[str, Runner] | None = None,
) -> dict:
    """The `shrinkflow bench-ultralytics` command's body: Ultralytics' OpenVINO FP32/INT8 of
    the trained model, written atomically to `out` (JSON) and returned.

    `checkpoint` is the project's trained `yolo` checkpoint (state_dict + model yaml), turned
    into a temporary Ultralytics .pt; `weights_pt` (a user's Ultralytics .pt) is used as it is
    instead when given. The dataset is the manifest's splits in a temp Ultralytics layout;
    the exports go to a temp folder too, or stay under `work` when given. `others` (e.g. the
    project's built engines, loaded as runners) are timed in the same call (see
    `ultralytics_int8_reference`).

    Raises:
        DataError: the checkpoint or manifest is missing or does not fit (names the file).
    """
    import torch

    from tasks.datasets.coco import read_manifest

    m = read_manifest(manifest)
    source = Path(weights_pt or checkpoint)
    if not source.is_file():
        raise DataError(f"{source}: file not found (the trained model to export)")
    lineage = {"weights": str(source), "weights_md5": md5_file(source)}
    with tempfile.TemporaryDirectory(prefix="shrinkflow-ulref-bench-") as tmp:
        tmp = Path(tmp)
        if weights_pt is None:
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
            weights_pt = to_ultralytics_pt(ckpt, tmp / "trained.pt", source=checkpoint)
        data_yaml = write_yolo_dataset(m, tmp / "data")
        result = ultralytics_int8_reference(
            weights_pt, data_yaml, m, cfg, Path(work or tmp / "export"), others
        )
    result.update(lineage)
    write_json(out, result)
    for name, row in result["variants"].items():
        log.info(
            "%s: map50 %.3f, %.3f ms p50 (%.3f ms with NMS), %.2f MB",
            name, row["map50"], row["latency_ms_p50"], row["latency_ms_p50_with_nms"],
            row["size_mb"],
        )  # fmt: skip
    return result
