"""Stage `evaluate@<target>`: KPIs of one engine on the test split, beside FP32 PyTorch eager.

The deployed engine, the uncompressed FP32 model built for the same runtime, and FP32 PyTorch
eager are measured in the same process: COCO mAP (pycocotools), precision/recall at
`evaluate.score_threshold`, per-class AP, latency p50/p95/p99 at batch 1 and throughput at
each of `throughput_batches`
(alternating timed blocks, see tasks/metrics/timing.py), file size, params, MACs. KPI keys follow
DESIGN.md; `delta_*` is the target minus the FP32 baseline; `parity` matches the target's
detections to FP32 PyTorch's by class and IoU.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np
import torch
import typer

from tasks.datasets.coco import DetectionSet, check_min_boxes, read_manifest
from tasks.engines import Runner, engine_size_mb, get
from tasks.harness.config import BuildEngineCfg, EvaluateCfg, ExportCfg, Kpi
from tasks.harness.io import meta, remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.metrics.detection import coco_metrics, detection_parity, predict
from tasks.metrics.timing import latency_stats, time_blocks
from tasks.models import ModelAdapter, load_checkpoint
from tasks.models.config import ModelCfg
from tasks.models.reference_graph import read as read_reference

log = logging.getLogger(__name__)
BASELINE = "pytorch_eager_fp32"
FP32_SAME_RUNTIME = "fp32_uncompressed"
IMPORTED_BASELINE = "onnxruntime_fp32_imported"  # family onnx: the user's graph, FP32, in ORT
QUALITY = ("map50", "map50_95", "precision", "recall")


def eager_runner(adapter: ModelAdapter, model, export_cfg: ExportCfg) -> Runner:
    """FP32 PyTorch eager with the same decode as the exported graph."""
    wrapped = adapter.deployable(
        model, export_cfg.max_detections, export_cfg.score_floor, fold=False
    )

    def run(x: np.ndarray):
        with torch.inference_mode():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    return run


def run(
    cfg: EvaluateCfg,
    *,
    target: str,
    engine_dir: Path,
    model_checkpoint: Path,
    baseline_checkpoint: Path,
    reference_dir: Path,
    manifest: dict,
    engine_cfg: BuildEngineCfg,
    export_cfg: ExportCfg,
    work: Path,
    model_cfg: ModelCfg | None = None,
    input_size: int | tuple[int, int] = 128,
) -> tuple[dict, list[dict]]:
    """Evaluate the deployed engine of `target` beside two references measured in the same
    process: the uncompressed FP32 model built for the same runtime, and FP32 PyTorch eager.

    `model_checkpoint` is the model the engine was built from (for MACs and params);
    `baseline_checkpoint` is the trained, uncompressed one (FP32 PyTorch eager);
    `reference_dir` is the reference stage's folder: its `model.onnx` (the uncompressed model,
    exported once) is built here for `target`, and its `reference.json` gives the uncompressed
    model's MACs, parameters and file size. For an imported ONNX (`family: onnx`, no PyTorch
    model) both references are the imported graph at `input_size` ((w, h) or a side), FP32:
    on the same runtime, and on ONNX Runtime in place of PyTorch eager. Returns (metrics,
    PR-curve rows).
    """
    facts = json.loads((engine_dir / "engine.json").read_text())
    if facts["status"] != "ok":
        return {"target": target, "status": facts["status"]}, []
    torch.set_num_threads(engine_cfg.threads)
    engine = get(target)
    ref = read_reference(reference_dir)
    baseline_name = IMPORTED_BASELINE if ref["imported"] else BASELINE
    uncompressed = (ref["macs"], ref["params"])
    if ref["imported"]:  # no PyTorch model: the FP32 reference is the imported graph itself
        size = input_size
        shape = dict.fromkeys((target, FP32_SAME_RUNTIME, BASELINE), uncompressed)
        eager = get("onnxruntime")
        (work / "reference").mkdir()
        eager.build(ref["onnx"], work / "reference", engine_cfg)
        reference = eager.load(work / "reference", engine_cfg)
    else:
        adapter, deployed, _ = load_checkpoint(model_checkpoint, model_cfg)
        _, baseline, _ = load_checkpoint(baseline_checkpoint, model_cfg)
        size = adapter.input_size(deployed)
        shape = {target: adapter.macs_and_params(deployed)}
        shape[FP32_SAME_RUNTIME] = shape[BASELINE] = uncompressed
        reference = eager_runner(adapter, baseline, export_cfg)
    baseline_size = ref["size_mb"]
    # The uncompressed FP32 model on the same runtime: what a user gets with no pipeline.
    (work / "fp32").mkdir()
    engine.build(ref["onnx"], work / "fp32", engine_cfg)
    runners = {
        target: engine.load(engine_dir, engine_cfg),
        FP32_SAME_RUNTIME: engine.load(work / "fp32", engine_cfg),
        BASELINE: reference,
    }
    test = DetectionSet(manifest, "test", size)
    rows = {name: predict(fn, test) for name, fn in runners.items()}
    quality = {name: coco_metrics(test.coco, r, cfg.score_threshold) for name, r in rows.items()}
    one = test.batch(slice(0, 1))
    lat = time_blocks(runners, one, warmup=cfg.warmup, runs=cfg.latency_runs, rounds=cfg.rounds)
    # An engine converted at batch 1 (LiteRT) has throughput at batch 1 only.
    batches = cfg.throughput_batches if getattr(engine, "takes_batch", True) else [1]
    thr = {
        b: time_blocks(
            runners,
            test.batch(np.arange(b) % len(test)),
            warmup=2,
            runs=cfg.throughput_runs,
            rounds=cfg.rounds,
        )
        for b in batches
    }
    top = max(batches)
    sizes = {
        target: engine_size_mb(engine_dir),
        FP32_SAME_RUNTIME: engine_size_mb(work / "fp32"),
        BASELINE: baseline_size,
    }
    kpis = {}
    for name in runners:
        kpis[name] = {
            **{k: quality[name][k] for k in QUALITY},
            **{k: v for k, v in latency_stats(lat[name], 1).items() if k != "throughput_ips"},
            "throughput_ips": latency_stats(thr[top][name], top)["throughput_ips"],
            **{
                f"throughput_ips_b{b}": latency_stats(thr[b][name], b)["throughput_ips"]
                for b in batches
            },
            "size_mb": sizes[name],
            "macs": shape[name][0],
            "params": shape[name][1],
        }
    base, same = kpis[BASELINE], kpis[FP32_SAME_RUNTIME]
    mine = kpis[target]
    metrics = {
        "target": target,
        "status": "ok",
        "threads": engine_cfg.threads,
        "throughput_batch": top,
        "test_images": len(test),
        **mine,
        **{f"delta_{k}": mine[k] - base[k] for k in QUALITY},
        "speedup_vs_eager": base["latency_ms_p50"] / mine["latency_ms_p50"],
        "speedup_vs_fp32_same_runtime": same["latency_ms_p50"] / mine["latency_ms_p50"],
        "size_reduction_vs_fp32": same["size_mb"] / mine["size_mb"],
        "macs_reduction": 1 - mine["macs"] / base["macs"],
        # Parity with the FP32 PyTorch model on the test split, in detections, not tensors.
        "parity_iou": cfg.parity_iou,
        "parity": detection_parity(
            rows[BASELINE], rows[target], iou=cfg.parity_iou, min_score=cfg.score_threshold
        ),
        "delta_ap50_per_class": {
            c: ap - ref if ap is not None and ref is not None else None
            for c, ap in quality[target]["ap50_per_class"].items()
            for ref in [quality[BASELINE]["ap50_per_class"].get(c)]
        },
        "fp32_same_runtime": {"name": FP32_SAME_RUNTIME, **same},
        "baseline": {"name": baseline_name, **base},
    }
    return metrics, quality[target]["pr_curve"]


def render_report(metrics: dict) -> str:
    if metrics["status"] != "ok":
        return f"# Evaluation: {metrics['target']}\n\nstatus: {metrics['status']}\n"
    keys = get_args(Kpi)  # every KPI, in DESIGN.md's order
    same, base, parity = metrics["fp32_same_runtime"], metrics["baseline"], metrics["parity"]
    rows = [f"| {k} | {metrics[k]:.4g} | {same[k]:.4g} | {base[k]:.4g} |" for k in keys]
    return "\n".join(
        [
            f"# Evaluation: {metrics['target']}",
            "",
            f"Test images: {metrics['test_images']} · threads: {metrics['threads']} · batch-1 "
            f"speed-up: {metrics['speedup_vs_fp32_same_runtime']:.2f}x vs the uncompressed FP32 "
            f"model on {metrics['target']}, {metrics['speedup_vs_eager']:.2f}x vs FP32 PyTorch "
            f"eager · file {metrics['size_reduction_vs_fp32']:.1f}x smaller · MACs "
            f"-{100 * metrics['macs_reduction']:.0f}%",
            "",
            f"| KPI | {metrics['target']} (deployed) | {same['name']} on {metrics['target']} "
            f"| {base['name']} |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"Parity with {base['name']} (detections scoring >= the operating threshold, same "
            f"class, IoU >= {metrics['parity_iou']}): {100 * parity['match_rate']:.1f}% of "
            f"{parity['reference_detections']} matched, {parity['unmatched_candidates']} extra, "
            f"score gap mean {parity['score_abs_diff_mean']:.3f} / max "
            f"{parity['score_abs_diff_max']:.3f}, matched IoU {parity['matched_iou_mean']:.3f}.",
            "",
            "| class | ΔAP@0.5 vs FP32 |",
            "| --- | --- |",
            *[
                f"| {c} | {d:+.4f} |"
                for c, d in metrics["delta_ap50_per_class"].items()
                if d is not None
            ],
            "",
        ]
    )


app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
    engine: Path = typer.Option(..., help="engine folder written by build_engine"),
    checkpoint: Path = typer.Option(
        Path("artifacts/distill/model.pt"), help="the model the engine was built from"
    ),
    baseline: Path = typer.Option(
        Path("artifacts/train/model.pt"), help="the trained, uncompressed FP32 model"
    ),
    reference: Path = typer.Option(
        Path("artifacts/reference"), help="the reference stage's folder (its FP32 ONNX)"
    ),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(..., help="e.g. artifacts/evaluate/<target>"),
) -> None:
    """Evaluate one engine target against the uncompressed FP32 model."""
    with stage_entry(f"evaluate@{target}", params) as ctx:
        cfg = ctx.params.evaluate
        ctx.log_params({**cfg.model_dump(mode="json"), "target": target})
        for stale in ("metrics.json", "report.md", "meta.json", "plots/pr_curve.csv"):
            remove(out / stale)
        splits = read_manifest(manifest)
        check_min_boxes(splits, manifest, "test", cfg.min_boxes, "evaluate.min_boxes")
        with tempfile.TemporaryDirectory() as work:
            metrics, curve = run(
                cfg,
                target=target,
                engine_dir=engine,
                model_checkpoint=checkpoint,
                baseline_checkpoint=baseline,
                reference_dir=reference,
                manifest=splits,
                engine_cfg=ctx.params.build_engine,
                export_cfg=ctx.params.export,
                model_cfg=ctx.params.model,
                input_size=ctx.params.train.input_size,
                work=Path(work),
            )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["recall", "precision"])
        writer.writeheader()
        writer.writerows(curve)
        write_text(out / "plots" / "pr_curve.csv", buf.getvalue())
        write_text(out / "report.md", render_report(metrics))
        write_json(
            out / "meta.json",
            meta(
                cfg,
                {
                    "engine": engine,
                    "checkpoint": checkpoint,
                    "baseline": baseline,
                    "reference": reference,
                },
                ("onnxruntime", "pycocotools"),
            ),
        )
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics(metrics)
        for f in ("report.md", "metrics.json", "plots/pr_curve.csv"):
            ctx.log_artifact(out / f, "evaluation")
        log.info("%s", render_report(metrics))


if __name__ == "__main__":
    app()
