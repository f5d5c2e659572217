"""Stage `quantize`: INT8 post-training quantization (and FP16) of the exported ONNX.

ONNX Runtime's quantization tools do the observers, calibration and QDQ insertion: symmetric
per-channel INT8 weights, per-tensor activations, calibrator chosen by name. Only convolutions
are quantized; the in-graph decode (sigmoid, peak pooling, top-K) stays float.

Accuracy-aware mode, when the every-conv INT8 model drops more than `max_map_drop`, quantizes
one conv at a time to measure each layer's val mAP@0.5 drop, then keeps the most sensitive
layers in float until the whole model's drop is within it (a model already within it costs no
per-layer evaluations: the report says so under `sensitivity_skipped`). With `keep_faster`,
each layer type (3x3, 1x1, depthwise, ...) is timed in INT8 and in float and kept in the faster
precision, and the deployable model falls back to float when
INT8 measures slower at batch 1 (it can at small channel counts on some CPUs). Those decisions
take repeated rounds and a noise margin (`keep_faster_margin`), and are recorded with their
evidence in `keep_faster.json` under a key of their inputs: the same inputs on the same machine
reuse them, so a re-run on a loaded CPU builds the same engine. The report's `precision` is read
from the deployed graph (QuantizeLinear nodes), never from the config.

`method` (per target) swaps in NNCF's INT8 (NNCF's ONNX backend, a QDQ ONNX every QDQ engine
builds: tasks/quantization/nncf_peers.py) for ONNX Runtime and OpenVINO targets (`nncf`), or
keeps whichever of the two scores the higher val mAP@0.5 on the target's own engine, ties going
to the faster there (`best`); the report's targets table records the choice and both
candidates' figures.

Temporary files (calibration copies, ONNX Runtime's own temp folders) live in `<out>/.tmp-work`,
which each run removes first: a killed run leaves nothing in the system temp folder.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import typer

from tasks.datasets.coco import DetectionSet, load_splits
from tasks.engines.int8 import qdq_types
from tasks.harness.config import Params, QuantizeCfg
from tasks.harness.io import check_onnx, copy_file, meta, remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.metrics.timing import time_blocks
from tasks.quantization.method import target_methods
from tasks.quantization.precision import (
    conv_precision,
    decision_key,
    faster,
    graph_precision,
    keep_faster_types,
    record,
    recorded,
)
from tasks.quantization.qdq import (  # noqa: F401  (re-exported: the stage's primitives)
    CALIBRATORS,
    NUM_QUANTIZED_BINS,
    QUANTIZED_OPS,
    calibrate,
    calibration_set,
    conv_names,
    layer_types,
    runner,
    session,
    to_fp16,
    to_int8,
    val_map,
)
from tasks.quantization.report import render, stage_metrics
from tasks.quantization.targets import target_models

log = logging.getLogger(__name__)
DECISIONS = "keep_faster.json"  # recorded keep-faster decisions, beside the outputs
WORK = ".tmp-work"  # temp work folder inside the output folder
CALIBRATOR_MODELS = "calibrators"  # every-conv INT8 per calibrator (compare_calibrators)


@contextlib.contextmanager
def temp_under(folder: Path) -> Iterator[Path]:
    """Make `folder` (emptied first) the temp folder of this process for the block: ONNX
    Runtime's quantizer and calibrator write their copies through `tempfile`."""
    remove(folder)
    folder.mkdir(parents=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(folder.resolve())  # absolute: converters chdir into their temp dirs
    try:
        yield folder
    finally:
        tempfile.tempdir = before
        remove(folder)


def run(
    cfg: QuantizeCfg,
    *,
    onnx_path: Path,
    train: DetectionSet,
    val: DetectionSet,
    out: Path,
    threads: int,
    qat_onnx: Path | None = None,
) -> dict:
    """Write model.int8.onnx, model.fp16.onnx and the deployable model.onnx into `out`.

    `qat_onnx`, when given, is the same model after quantization-aware fine-tuning
    (tasks/quantization/qat.py): the INT8 models are built from it, `onnx_path` stays the float
    reference.
    Returns the report: calibration ids and hash, per-calibrator val mAP, sensitivity table,
    per-layer precision, latencies and the precision chosen.
    """
    images, ids, ids_md5 = calibration_set(cfg, train)
    layers = conv_names(onnx_path)
    report: dict = {
        "calibration": {"image_ids": ids, "md5": ids_md5, "count": len(ids)},
        "calibrator": cfg.calibrator,
    }
    fp32_map = val_map(onnx_path, val, threads)
    report["val_map50"] = {"fp32": fp32_map}
    with temp_under(out / WORK) as work, tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        cache = {name: tmp / f"ranges-{name}.json" for name in CALIBRATORS}
        if qat_onnx is not None:  # what QAT buys: the same calibrator without it
            calibrate(onnx_path, images, cfg, cfg.calibrator, tmp / "ptq.json")
            to_int8(onnx_path, tmp / "ptq.onnx", tmp / "ptq.json", cfg, cfg.calibrator)
            report["val_map50"]["int8_without_qat"] = val_map(tmp / "ptq.onnx", val, threads)
        src = qat_onnx or onnx_path  # what the INT8 models are built from
        compared = {}  # every conv INT8 with each calibrator: kept for variants' table
        (out / CALIBRATOR_MODELS).mkdir(parents=True, exist_ok=True)
        for name in CALIBRATORS if cfg.compare_calibrators else [cfg.calibrator]:
            calibrate(src, images, cfg, name, cache[name])
            if cfg.compare_calibrators:
                to_int8(src, tmp / f"{name}.onnx", cache[name], cfg, name)
                report["val_map50"][f"int8_{name}"] = val_map(tmp / f"{name}.onnx", val, threads)
                compared[name] = f"{CALIBRATOR_MODELS}/int8_{name}.onnx"
                copy_file(tmp / f"{name}.onnx", out / compared[name])
        report["calibrator_models"] = {
            "source": "qat" if qat_onnx is not None else "exported",
            "activation_type": cfg.activation_type,
            "files": compared,
        }
        write_json(out / CALIBRATOR_MODELS / "index.json", report["calibrator_models"])
        int8, cache = tmp / "int8.onnx", cache[cfg.calibrator]
        to_int8(src, int8, cache, cfg, cfg.calibrator)
        int8_map = val_map(int8, val, threads)
        excluded: list[str] = []
        if cfg.accuracy_aware and fp32_map - int8_map <= cfg.max_map_drop:
            report["sensitivity_skipped"] = (
                f"every conv INT8 is within quantize.max_map_drop ({fp32_map - int8_map:+.4f} "
                f"<= {cfg.max_map_drop}): no layer needs float, none measured"
            )
        elif cfg.accuracy_aware:
            sensitivity = {}
            for layer in layers:
                to_int8(src, tmp / "one.onnx", cache, cfg, cfg.calibrator, only=[layer])
                sensitivity[layer] = fp32_map - val_map(tmp / "one.onnx", val, threads)
            report["sensitivity"] = sensitivity  # val mAP@0.5 lost with only that layer in INT8
            for layer in sorted(layers, key=lambda k: -sensitivity[k]):
                if fp32_map - int8_map <= cfg.max_map_drop:
                    break
                excluded.append(layer)
                to_int8(src, int8, cache, cfg, cfg.calibrator, exclude=excluded)
                int8_map = val_map(int8, val, threads)
        # the keep-faster decisions depend on these inputs only: recorded under their key
        key = decision_key(
            model=src,
            ranges=cache,
            excluded=sorted(excluded),
            threads=threads,
            cfg=cfg.model_dump(mode="json"),
        )
        known = recorded(out / DECISIONS, key) if cfg.keep_faster else None
        if cfg.keep_faster:
            x = val.batch(slice(0, 1))
            types = keep_faster_types(
                src, int8, cache, cfg, excluded, x, threads, known and known["layer_types"]
            )
            report["layer_types"] = types
            if known is None:  # recorded now: a run killed later reuses it
                known = {"layer_types": {k: t["precision"] for k, t in types.items()}}
                record(out / DECISIONS, key, known)
                known = None
            slower = [n for t in types.values() if t["precision"] == "fp32" for n in t["layers"]]
            if slower:
                excluded += slower
                to_int8(src, int8, cache, cfg, cfg.calibrator, exclude=excluded)
                int8_map = val_map(int8, val, threads)
        report["val_map50"]["int8"] = int8_map
        report["int8_map_drop"] = fp32_map - int8_map
        built = conv_precision(int8)  # read from the graph, not from `excluded`
        report["layer_precision"] = {k: built.get(k, "fp32") for k in layers}
        copy_file(int8, out / "model.int8.onnx")
        to_fp16(onnx_path, tmp / "fp16.onnx")
        copy_file(tmp / "fp16.onnx", out / "model.fp16.onnx")
    report["val_map50"]["fp16"] = val_map(out / "model.fp16.onnx", val, threads)
    candidates = {
        "fp32": onnx_path,
        "int8": out / "model.int8.onnx",
        "fp16": out / "model.fp16.onnx",
    }
    runners = {k: runner(session(p, threads)) for k, p in candidates.items()}
    rounds = cfg.keep_faster_rounds
    times = time_blocks(runners, val.batch(slice(0, 1)), warmup=10, runs=30 * rounds, rounds=rounds)
    latency = {k: float(np.median(v) * 1e3) for k, v in times.items()}
    report["latency_ms_p50_batch1"] = latency
    chosen, reason = cfg.precision, "as configured"
    if cfg.keep_faster and cfg.precision != "fp32":
        if known is not None and "deployed" in known and known["deployed"] in candidates:
            chosen, reason = known["deployed"], f"{known['reason']} (recorded decision reused)"
        else:
            ev = faster(times["fp32"], times[cfg.precision], rounds, cfg.keep_faster_margin)
            if ev["faster"]:
                chosen = "fp32"
                reason = (
                    f"{cfg.precision} measured slower than fp32 at batch 1 "
                    f"({ev['reference_ms']:.3f} vs {ev['candidate_ms']:.3f} ms, beyond the "
                    f"{cfg.keep_faster_margin:.0%} margin in every round): kept fp32"
                )
            report["deployed_timing"] = ev
    copy_file(candidates[chosen], out / "model.onnx")
    graph = graph_precision(out / "model.onnx")
    if graph["precision"] != chosen:
        reason += f"; the built graph computes in {graph['precision']}"
    report["precision"] = graph["precision"]  # what was built, whatever was asked for
    report["precision_configured"] = cfg.precision
    report["precision_reason"] = reason
    report["graph"] = graph
    if cfg.keep_faster:
        decision = {
            "layer_types": {k: t["precision"] for k, t in report.get("layer_types", {}).items()},
            "deployed": chosen,
            "reason": reason.removesuffix(" (recorded decision reused)"),
        }
        reused = known is not None and "deployed" in known
        report["keep_faster"] = {"key": key, "reused": reused, **decision}
        if not reused:
            record(out / DECISIONS, key, decision)
    elif not (out / DECISIONS).exists():  # a declared DVC out: no decisions with it off
        write_json(out / DECISIONS, {})
    return report


def _qat(
    params: Params, student: Path, teacher: Path, train: DetectionSet, val: DetectionSet, dst: Path
) -> dict:
    """Quantization-aware fine-tune of the exported model's checkpoint, exported to `dst`."""
    from tasks.models import load_checkpoint
    from tasks.models.onnx_export import to_onnx
    from tasks.quantization.qat import finetune

    adapter, model, _ = load_checkpoint(student, params.model)
    tuned, rows = finetune(
        adapter,
        model,
        load_checkpoint(teacher, params.model)[1],
        params.quantize,
        params.distill,
        params.train,
        train=train,
        val=val,
    )
    to_onnx(adapter, tuned, params.export, dst)
    return {
        "epochs": params.quantize.qat_epochs,
        "lr": params.quantize.qat_lr,
        "val_map50_fake_quant": [r["val_map50"] for r in rows],
    }


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    onnx_path: Path = typer.Option(Path("artifacts/export/model.onnx"), "--onnx"),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    student: Path = typer.Option(
        Path("artifacts/distill/model.pt"), help="the exported model's checkpoint (QAT only)"
    ),
    teacher: Path = typer.Option(Path("artifacts/train/model.pt"), help="QAT's KD teacher"),
    out: Path = typer.Option(Path("artifacts/quantize")),
) -> None:
    """Quantize the exported model; write the deployable model.onnx and a report."""
    with stage_entry("quantize", params) as ctx:
        cfg = ctx.params.quantize
        ctx.log_params(cfg)
        for stale in (
            "model.onnx",
            "model.int8.onnx",
            "model.fp16.onnx",
            "metrics.json",
            "report.json",
            "report.md",
            "meta.json",
            "targets",
            CALIBRATOR_MODELS,
        ):
            remove(out / stale)
        out.mkdir(parents=True, exist_ok=True)
        check_onnx(onnx_path)
        size = ctx.params.train.input_size
        _, train, val = load_splits(manifest, size)
        with temp_under(out / ".tmp-qat") as tmp:
            qat_onnx, qat_report = None, None
            if cfg.qat_epochs:
                qat_onnx = Path(tmp) / "qat.onnx"
                qat_report = _qat(ctx.params, student, teacher, train, val, qat_onnx)
            inputs = {
                "onnx_path": onnx_path,
                "train": train,
                "val": val,
                "threads": ctx.params.build_engine.threads,
                "qat_onnx": qat_onnx,
            }
            targets = ctx.params.build_engine.targets
            target_methods(cfg, targets)  # a bad quantize.method fails before any work
            first = qdq_types(cfg.activation_type, targets)[0]  # the deployable model.onnx's
            report = run(cfg.model_copy(update={"activation_type": first}), out=out, **inputs)
            report["targets"] = target_models(
                cfg, targets, report, out, ctx.params.build_engine, build=run, **inputs
            )
        if qat_report:
            report["qat"] = qat_report
        write_json(out / "report.json", report)
        write_text(out / "report.md", render(report))
        write_json(out / "meta.json", meta(cfg, {"onnx": onnx_path}, ("onnxruntime", "onnx")))
        metrics = stage_metrics(report)
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics(metrics)
        ctx.log_artifact(out / "report.md")
        ctx.log_artifact(out / "report.json")
        log.info("%s", render(report))


if __name__ == "__main__":
    app()
