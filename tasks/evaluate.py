"""Stage `evaluate@<target>`: KPIs of one engine on the test split, beside FP32 PyTorch eager.

Both are measured in the same process: COCO mAP (pycocotools), precision/recall at
`evaluate.score_threshold`, latency p50/p95 at batch 1 and throughput at `throughput_batch`
(alternating timed blocks, see tasks/bench.py), file size, params, MACs. KPI keys follow
DESIGN.md; `delta_*` is the target minus the FP32 baseline.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
import typer

from tasks.bench import latency_stats, time_blocks
from tasks.cli import stage_entry
from tasks.coco import DetectionSet
from tasks.config import BuildEngineCfg, EvaluateCfg, ExportCfg
from tasks.engines import get
from tasks.io import meta, remove, write_json, write_text
from tasks.metrics import coco_metrics, predict
from tasks.model import DetectorWithDecode, load_checkpoint, macs_and_params

log = logging.getLogger(__name__)
BASELINE = "pytorch_eager_fp32"
QUALITY = ("map50", "map50_95", "precision", "recall")


def run(
    cfg: EvaluateCfg,
    *,
    target: str,
    engine_dir: Path,
    checkpoint: Path,
    manifest: dict,
    engine_cfg: BuildEngineCfg,
    export_cfg: ExportCfg,
) -> tuple[dict, list[dict]]:
    """Evaluate `target` and the FP32 eager baseline. Returns (metrics, PR-curve rows)."""
    facts = json.loads((engine_dir / "engine.json").read_text())
    if facts["status"] != "ok":
        return {"target": target, "status": facts["status"]}, []
    model, _ = load_checkpoint(checkpoint)
    torch.set_num_threads(engine_cfg.threads)
    eager = DetectorWithDecode(model, export_cfg.max_detections, export_cfg.score_floor).eval()

    def eager_runner(x: np.ndarray):
        with torch.inference_mode():
            return [t.numpy() for t in eager(torch.from_numpy(x))]

    runners = {target: get(target).load(engine_dir, engine_cfg), BASELINE: eager_runner}
    test = DetectionSet(manifest, "test", model.cfg.input_size)
    quality = {
        name: coco_metrics(test.coco, predict(fn, test), cfg.score_threshold)
        for name, fn in runners.items()
    }
    one = test.batch(slice(0, 1))
    many = test.batch(np.arange(cfg.throughput_batch) % len(test))
    lat = time_blocks(runners, one, warmup=cfg.warmup, runs=cfg.latency_runs, rounds=cfg.rounds)
    thr = time_blocks(runners, many, warmup=2, runs=cfg.throughput_runs, rounds=cfg.rounds)
    macs, n_params = macs_and_params(model)
    sizes = {
        target: (engine_dir / facts["engine_file"]).stat().st_size / 2**20,
        BASELINE: checkpoint.stat().st_size / 2**20,
    }
    kpis = {}
    for name in runners:
        kpis[name] = {
            **{k: quality[name][k] for k in QUALITY},
            "latency_ms_p50": latency_stats(lat[name], 1)["latency_ms_p50"],
            "latency_ms_p95": latency_stats(lat[name], 1)["latency_ms_p95"],
            "throughput_ips": latency_stats(thr[name], cfg.throughput_batch)["throughput_ips"],
            "size_mb": sizes[name],
            "params": n_params,
            "macs": macs,
        }
    base = kpis[BASELINE]
    metrics = {
        "target": target,
        "status": "ok",
        "threads": engine_cfg.threads,
        "test_images": len(test),
        **kpis[target],
        **{f"delta_{k}": kpis[target][k] - base[k] for k in QUALITY},
        "speedup_vs_eager": base["latency_ms_p50"] / kpis[target]["latency_ms_p50"],
        "baseline": {"name": BASELINE, **base},
    }
    return metrics, quality[target]["pr_curve"]


def render_report(metrics: dict) -> str:
    if metrics["status"] != "ok":
        return f"# Evaluation: {metrics['target']}\n\nstatus: {metrics['status']}\n"
    keys = [
        *QUALITY,
        "latency_ms_p50",
        "latency_ms_p95",
        "throughput_ips",
        "size_mb",
        "params",
        "macs",
    ]
    base = metrics["baseline"]
    rows = [f"| {k} | {metrics[k]:.4g} | {base[k]:.4g} |" for k in keys]
    return "\n".join(
        [
            f"# Evaluation: {metrics['target']}",
            "",
            f"Test images: {metrics['test_images']} · threads: {metrics['threads']} · "
            f"batch-1 speed-up vs eager: {metrics['speedup_vs_eager']:.2f}x",
            "",
            f"| KPI | {metrics['target']} | {base['name']} |",
            "| --- | --- | --- |",
            *rows,
            "",
        ]
    )


app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
    engine: Path = typer.Option(..., help="engine folder written by build_engine"),
    checkpoint: Path = typer.Option(Path("artifacts/train/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(..., help="e.g. artifacts/evaluate/<target>"),
) -> None:
    """Evaluate one engine target against the FP32 PyTorch baseline."""
    with stage_entry(f"evaluate@{target}", params) as ctx:
        cfg = ctx.params.evaluate
        ctx.log_params({**cfg.model_dump(mode="json"), "target": target})
        for stale in ("metrics.json", "report.md", "meta.json", "plots/pr_curve.csv"):
            remove(out / stale)
        metrics, curve = run(
            cfg,
            target=target,
            engine_dir=engine,
            checkpoint=checkpoint,
            manifest=json.loads(manifest.read_text()),
            engine_cfg=ctx.params.build_engine,
            export_cfg=ctx.params.export,
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["recall", "precision"])
        writer.writeheader()
        writer.writerows(curve)
        write_text(out / "plots" / "pr_curve.csv", buf.getvalue())
        write_text(out / "report.md", render_report(metrics))
        write_json(
            out / "meta.json",
            meta(cfg, {"engine": engine, "checkpoint": checkpoint}, ("onnxruntime", "pycocotools")),
        )
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics(metrics)
        for f in ("report.md", "metrics.json", "plots/pr_curve.csv"):
            ctx.log_artifact(out / f, "evaluation")
        log.info("%s", render_report(metrics))


if __name__ == "__main__":
    app()
