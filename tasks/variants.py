"""Stage `variants`: every step of the compression recipe on the test split, in one table.

Trained (the reference stage's FP32 graph, not re-exported here), pruned and distilled FP32
models, INT8 with each calibrator (every conv INT8, on the distilled model), the deployed model
on ONNX Runtime (`deployed`: the quantize stage's model for that target, as
build_engine@onnxruntime builds it: its INT8 with the float layers it kept, or NNCF's where
`quantize.method` picked NNCF there), FP16, and OpenVINO's bf16 precision on the distilled
model; the deployed model on OpenVINO too (`deployed_openvino`, as build_engine@openvino builds
it), and beside it what NNCF gives you without Shrinkflow: NNCF's PTQ and accuracy-controlled
INT8 of the distilled model on OpenVINO (tasks/quantization/nncf_peers.py; `skipped: nncf not
installed` rows without NNCF). For each: mAP@0.5, mAP@0.5:0.95, batch-1 latency p50, file size
and MACs. ONNX Runtime runs the rest; all variants are timed in one process, in alternating
blocks (tasks/metrics/timing.py), so the latency column compares as ratios. The
INT8-per-calibrator models are the quantize stage's own (`calibrators/`) when it compared
calibrators on the exported model, made here otherwise.

Each deployed row (`OURS`) is also set against each peer row present (`PEER_ROWS`: NNCF's
accuracy-controlled INT8, Ultralytics' INT8 export) on the same test images: the mAP@0.5
difference with its paired bootstrap interval (tasks/metrics/bootstrap.py) and the latency
ratio, so "equal or better mAP" is judged against the split's own noise.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import typer

from tasks.datasets.coco import DetectionSet
from tasks.engines import engine_size_mb, get
from tasks.harness.config import Params
from tasks.harness.io import remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.metrics.bootstrap import match_table, paired_tables
from tasks.metrics.detection import coco_map, predict
from tasks.metrics.timing import latency_stats, time_blocks
from tasks.models import adapter_for, load_checkpoint, trains_in_torch
from tasks.models.onnx_export import to_onnx
from tasks.models.onnx_graph import macs_and_params
from tasks.models.reference_graph import read as read_reference
from tasks.quantization import nncf_peers
from tasks.quantization.qdq import CALIBRATORS, calibrate, calibration_set, to_int8

log = logging.getLogger(__name__)
COLUMNS = ("map50", "map50_95", "latency_ms_p50", "size_mb", "macs")


def run(
    params: Params,
    *,
    checkpoints: dict[str, Path],
    exported: Path,
    quantized: Path,
    reference: Path,
    manifest: dict,
    work: Path,
) -> dict[str, dict]:
    """{variant: {runtime, map50, map50_95, latency_ms_p50, size_mb, macs}}.

    `checkpoints` maps "trained", "pruned" and "distilled" to their model.pt; `exported` is the
    export stage's ONNX of the distilled one; `quantized` is the quantize stage's folder
    (model.onnx, model.fp16.onnx, report.json); `reference` is the reference stage's folder
    (the trained model's ONNX and its MACs: the `trained` row).
    """
    cfg, engine_cfg = params.quantize, params.build_engine
    size, onnx_files, macs = fp32_graphs(params, checkpoints, exported, reference, work)
    distilled = exported
    images, _, _ = calibration_set(cfg, DetectionSet(manifest, "train", size))
    report = json.loads((quantized / "report.json").read_text())
    if cfg.compare_calibrators:  # off: no int8_<calibrator> rows (ORT's entropy search is slow)
        onnx_files |= calibrator_models(report, quantized, distilled, images, cfg, work)
    # what build_engine@onnxruntime builds: the target's own model (NNCF's where
    # quantize.method picked it for that target), else the stage's deployable model.onnx
    ort_target = target_model(quantized, "onnxruntime")
    onnx_files["deployed"] = ort_target if ort_target.exists() else quantized / "model.onnx"
    deployed_precision = report.get("targets", {}).get("onnxruntime", {}).get("precision")
    onnx_files["fp16"] = quantized / "model.fp16.onnx"
    bf16 = engine_cfg.model_copy(update={"openvino_precision": "bf16"})
    builds = {name: ("onnxruntime", path, engine_cfg) for name, path in onnx_files.items()}
    builds["bf16"] = ("openvino", distilled, bf16)
    deployed_ov = target_model(quantized, "openvino")
    if deployed_ov.exists():  # the deployed model as build_engine@openvino builds it
        builds["deployed_openvino"] = ("openvino", deployed_ov, engine_cfg)
    litert_source = target_model(quantized, "litert")
    if litert_source.with_suffix(".tflite").exists():  # LiteRT's model, as quantize made it
        builds["litert"] = ("litert", litert_source, engine_cfg)
    runners, sizes = {}, {}
    for name, (target, path, target_cfg) in builds.items():
        folder = work / f"engine-{name}"
        folder.mkdir()
        get(target).build(path, folder, target_cfg)
        runners[name] = get(target).load(folder, target_cfg)
        sizes[name] = engine_size_mb(folder)
    skipped: dict[str, str] = {}
    peer_facts: dict[str, dict] = {}
    val = DetectionSet(manifest, "val", size)
    peers = (
        _nncf_peers(cfg, distilled, images, val, engine_cfg.threads)
        if params.variants.peers
        else {}
    )
    for name, made in peers.items():
        if isinstance(made, str):  # why it was not made
            skipped[name] = made
            continue
        folder = work / f"engine-{name}"
        nncf_peers.save(made[0], folder)
        peer_facts[name] = made[1]
        builds[name] = ("openvino (NNCF)", None, None)
        runners[name] = get("openvino").load(folder, engine_cfg)
        sizes[name] = engine_size_mb(folder)
    quality_runners = dict(runners)
    if params.variants.peers and params.model.family == "yolo":  # Ultralytics' own INT8 export
        reference = _ultralytics_reference(params, checkpoints["trained"], manifest, work)
        for name, ex in reference.items():
            builds[name] = ("openvino (Ultralytics' export, host NMS)", None, None)
            runners[name] = ex.detection_runner(timed=True)  # its NMS on the host, timed too
            quality_runners[name] = ex.detection_runner()
            sizes[name] = ex.size_mb
            macs[name] = macs["trained"]  # the unpruned model, counted as ours are
    test = DetectionSet(manifest, "test", size)
    ev = params.evaluate
    # Nine variants within ~0.1 ms of each other: 5x evaluate's sample, in 2x its rounds.
    times = time_blocks(
        runners,
        test.batch(slice(0, 1)),
        warmup=ev.warmup,
        runs=5 * ev.latency_runs,
        rounds=2 * ev.rounds,
    )
    table: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    for name, (target, _, _) in builds.items():
        rows[name] = predict(quality_runners[name], test)
        quality = coco_map(test.coco, rows[name])
        source = name if name in macs else "distilled"
        table[name] = {
            "runtime": target + (" (bf16 hint)" if name == "bf16" else ""),
            "precision": (deployed_precision or report["precision"])
            if name == "deployed"
            else None,
            "map50": quality["map50"],
            "map50_95": quality["map50_95"],
            "latency_ms_p50": latency_stats(times[name], 1)["latency_ms_p50"],
            "size_mb": sizes[name],
            "macs": macs[source],
        }
        if name in peer_facts:
            table[name]["nncf"] = peer_facts[name]
    for name, why in skipped.items():
        table[name] = {"runtime": "openvino (NNCF)", "precision": None, "status": why}
    matches = {  # each compared row's per-image matches, built once (one COCOeval each)
        name: match_table(test.coco, rows[name]) for name in (*OURS, *PEER_ROWS) if name in rows
    }
    for ours in OURS:
        for peer in PEER_ROWS:
            if ours in matches and peer in matches:
                pair = (matches[ours], matches[peer], len(test), table[ours], table[peer])
                table[ours].setdefault("vs_peer", {})[peer] = versus(*pair, params.variants)
    return table


OURS = ("deployed", "deployed_openvino", "litert")  # what the pipeline deploys, per runtime
PEER_ROWS = ("nncf_accuracy_control", "ultralytics_openvino_int8")  # what a user gets without us


def versus(ours: list, peer: list, images: int, mine: dict, theirs: dict, cfg) -> dict:
    """Our deployed row against a peer's on the same `images` test images (their
    `match_table`s): the mAP@0.5 difference with its paired bootstrap interval (ours - peer)
    and the latency ratio (peer / ours; > 1: ours is faster). `verdict`: `better` / `worse`
    when the interval excludes 0, else `equal within noise` (a test split of a few hundred
    images cannot tell apart differences of ~1 point)."""
    boot = paired_tables(
        ours, peer, images, resamples=cfg.resamples, confidence=cfg.confidence, seed=0
    )
    lo, hi = boot["ci_low"], boot["ci_high"]
    return {
        "map50_diff": boot["diff"],
        "ci_low": lo,
        "ci_high": hi,
        "confidence": cfg.confidence,
        "verdict": "better" if lo > 0 else "worse" if hi < 0 else "equal within noise",
        "speedup": theirs["latency_ms_p50"] / mine["latency_ms_p50"],
    }


def target_model(quantized: Path, target: str) -> Path:
    """The model the quantize stage made for `target` (what build_engine@<target> builds)."""
    return quantized / "targets" / target / "model.onnx"


def fp32_graphs(
    params: Params, checkpoints: dict[str, Path], exported: Path, reference: Path, work: Path
) -> tuple[int | tuple[int, int], dict[str, Path], dict[str, int]]:
    """(input size, {variant: FP32 ONNX}, {variant: MACs}) of the trained, pruned and distilled
    models. The trained one is the reference stage's graph and MACs (`reference`, exported once
    per `dvc repro`); the pruned one is exported here (to `work`); the distilled one is
    `exported`. An imported ONNX has only the distilled row: its graph is the start."""
    adapter = adapter_for(params.model)
    if not trains_in_torch(adapter):
        return (
            params.train.input_size,
            {"distilled": exported},
            {"distilled": macs_and_params(exported)[0]},
        )
    ref = read_reference(reference)
    models = {
        name: load_checkpoint(checkpoints[name], params.model)[1]
        for name in ("pruned", "distilled")
    }
    onnx_files = {"trained": ref["onnx"], "pruned": work / "pruned.onnx", "distilled": exported}
    to_onnx(adapter, models["pruned"], params.export, onnx_files["pruned"])
    macs = {name: adapter.macs_and_params(model)[0] for name, model in models.items()}
    macs["trained"] = ref["macs"]
    return adapter.input_size(models["distilled"]), onnx_files, macs


def calibrator_models(
    report: dict, quantized: Path, distilled: Path, images, cfg, work: Path
) -> dict[str, Path]:
    """{`int8_<calibrator>`: every-conv INT8 ONNX of the distilled model}: the quantize stage's
    own (its `calibrators/`, when it compared calibrators on this model: no QAT), else made
    here with the same calibration images."""
    saved = report.get("calibrator_models", {})
    if saved.get("source") == "exported" and set(saved.get("files", {})) == set(CALIBRATORS):
        return {f"int8_{name}": quantized / path for name, path in saved["files"].items()}
    files = {}
    for name in CALIBRATORS:
        calibrate(distilled, images, cfg, name, work / f"ranges-{name}.json")
        files[f"int8_{name}"] = work / f"int8_{name}.onnx"
        to_int8(distilled, files[f"int8_{name}"], work / f"ranges-{name}.json", cfg, name)
    return files


def _nncf_peers(cfg, distilled: Path, images, val: DetectionSet, threads: int) -> dict:
    """{peer: (OpenVINO model, facts) or why it was skipped}: NNCF's PTQ and accuracy-controlled
    INT8 of the distilled model (tasks/quantization/nncf_peers.py), what NNCF gives without
    Shrinkflow."""
    if why := nncf_peers.unavailable():
        log.warning("variants: no NNCF rows: %s", why)
        return {name: "skipped: nncf not installed" for name in nncf_peers.PEERS}
    return nncf_peers.peers(distilled, images, val, cfg, threads)


ULTRALYTICS_INT8 = "ultralytics_openvino_int8"  # the unpruned model, as Ultralytics exports it


def _ultralytics_reference(params: Params, trained: Path, manifest: dict, work: Path) -> dict:
    """{name: export} of Ultralytics' own OpenVINO INT8 export (NNCF) of the trained, unpruned
    model: what a YOLO user gets without the pipeline (tasks/models/ultralytics_export.py)."""
    from tasks.models import ultralytics_export as ulex
    from tasks.models import ultralytics_io as ulio
    from tasks.models.checkpoint import read_checkpoint

    if why := ulex.skip_reason():
        log.warning("variants: no Ultralytics reference row: %s", why)
        return {}
    pt = ulio.to_ultralytics_pt(read_checkpoint(trained), work / "ulref" / "trained.pt", trained)
    data_yaml = ulio.write_yolo_dataset(manifest, work / "ulref" / "data")
    exports = ulex.ultralytics_exports(
        pt, data_yaml, ulex.reference_cfg(params), work / "ulref" / "ir", names=[ULTRALYTICS_INT8]
    )
    return exports


def render(table: dict[str, dict]) -> str:
    lines = [
        "# Compression variants (test split, batch 1, one process)",
        "",
        "`int8_<calibrator>`: every conv INT8 on the distilled model. `deployed`: what the "
        "quantize stage chose for ONNX Runtime (its float layers kept, or NNCF's model where "
        "quantize.method picked it; see its report).",
        "",
        "`deployed_openvino`: the same deployed choice as build_engine@openvino builds it. "
        "`nncf_ptq`, `nncf_accuracy_control`: what NNCF gives you without Shrinkflow (its "
        "default PTQ and its accuracy-controlled INT8 with max drop `quantize.max_map_drop` on "
        "val mAP@0.5, of the distilled model, on OpenVINO; tasks/quantization/nncf_peers.py).",
        "",
        "| variant | runtime | mAP@0.5 | mAP@0.5:0.95 | latency p50 (ms) | size (MB) | MACs (M) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in table.items():
        if "status" in r:
            lines.append(f"| {name} | {r['runtime']} | {r['status']} | | | | |")
            continue
        label = f"{name} ({r['precision']})" if r["precision"] else name
        lines.append(
            f"| {label} | {r['runtime']} | {r['map50']:.4f} | {r['map50_95']:.4f} "
            f"| {r['latency_ms_p50']:.3f} | {r['size_mb']:.3f} | {r['macs'] / 1e6:.1f} |"
        )
    versus_rows = [(n, p, v) for n, r in table.items() for p, v in r.get("vs_peer", {}).items()]
    if versus_rows:
        conf = versus_rows[0][2]["confidence"]
        lines += [
            "",
            f"Ours against each peer on the same test images: mAP@0.5 difference (ours - peer) "
            f"with its {conf:.0%} paired bootstrap interval over test images, and how many "
            "times faster ours is at batch 1 (same process).",
            "",
            "| ours | peer | mAP@0.5 diff (points) | interval | verdict | faster |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, peer, v in versus_rows:
            lines.append(
                f"| {name} | {peer} | {100 * v['map50_diff']:+.2f} | [{100 * v['ci_low']:+.2f}, "
                f"{100 * v['ci_high']:+.2f}] | {v['verdict']} | {v['speedup']:.2f}x |"
            )
    peers = {name: r["nncf"] for name, r in table.items() if "nncf" in r}
    if peers:
        lines += [
            "",
            "| NNCF peer | made by | val mAP@0.5 (FP32) | val mAP@0.5 | drop | convs INT8 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, f in peers.items():
            met = {True: " (within max drop)", False: " (max drop not met)"}.get(
                f.get("drop_met"), ""
            )
            lines.append(
                f"| {name} | {f['made_by']} | {f['val_map50_fp32']:.4f} | {f['val_map50']:.4f} "
                f"| {f['val_map50_drop']:+.4f}{met} | {f['convs_int8']}/{f['convs']} |"
            )
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    trained: Path = typer.Option(Path("artifacts/train/model.pt")),
    pruned: Path = typer.Option(Path("artifacts/prune/model.pt")),
    distilled: Path = typer.Option(Path("artifacts/distill/model.pt")),
    exported: Path = typer.Option(Path("artifacts/export/model.onnx")),
    quantized: Path = typer.Option(Path("artifacts/quantize")),
    reference: Path = typer.Option(
        Path("artifacts/reference"), help="the reference stage's folder: the trained FP32 row"
    ),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/variants")),
) -> None:
    """Tabulate trained / pruned / distilled / INT8 per calibrator / deployed / FP16 / bf16 /
    NNCF's peers."""
    with stage_entry("variants", params) as ctx:
        for stale in ("report.md", "metrics.json"):
            remove(out / stale)
        with tempfile.TemporaryDirectory(prefix="shrinkflow-variants-") as work:
            table = run(
                ctx.params,
                checkpoints={"trained": trained, "pruned": pruned, "distilled": distilled},
                exported=exported,
                quantized=quantized,
                reference=reference,
                manifest=json.loads(manifest.read_text()),
                work=Path(work),
            )
        write_text(out / "report.md", render(table))
        write_json(out / "metrics.json", table)
        ctx.log_metrics(
            {f"{name}.{k}": r[k] for name, r in table.items() if "status" not in r for k in COLUMNS}
            | {f"{name}.vs_peer": r["vs_peer"] for name, r in table.items() if "vs_peer" in r}
        )
        ctx.log_artifact(out / "report.md")
        log.info("%s", render(table))


if __name__ == "__main__":
    app()
