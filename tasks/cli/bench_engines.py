"""`shrinkflow bench`: every engine `build_engine` built, beside FP32 PyTorch eager, in one process.

Loads every engine built with status ok (the others are listed with their reason), FP32 PyTorch
eager of the trained model and, with `uncompressed`, the trained model's ONNX from the reference
stage built for ONNX Runtime, OpenVINO f32 and bf16 (and LiteRT's float32 conversion when LiteRT
is a target): what a user gets with no pipeline, on each CPU runtime. All are timed at one batch
size in shuffled, alternating blocks with warm-up and a fixed thread count; each gets its ratio to
eager and, for a built target, to the uncompressed model on the same runtime.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tasks.datasets.coco import DetectionSet
from tasks.engines import get
from tasks.evaluate import BASELINE, eager_runner
from tasks.harness.config import Params
from tasks.metrics.timing import latency_stats, time_blocks
from tasks.models import load_checkpoint
from tasks.models.reference_graph import read as read_reference


def run(
    cfg: Params,
    *,
    engines_dir: Path,
    baseline: Path,
    reference: Path,
    manifest: Path,
    batch: int,
    runs: int,
    rounds: int,
    uncompressed: bool,
) -> dict:
    """Time every runtime (see the module docstring); returns per-runtime latency statistics
    with `speedup_vs_eager` (and `speedup_vs_fp32_same_runtime`), and the skipped targets."""
    torch.set_num_threads(cfg.build_engine.threads)
    runners, skipped = {}, {}
    for target in cfg.build_engine.targets:
        facts = json.loads((engines_dir / target / "engine" / "engine.json").read_text())
        if facts["status"] == "ok":
            runners[target] = get(target).load(engines_dir / target / "engine", cfg.build_engine)
        else:
            skipped[target] = facts["status"]
    adapter, model, _ = load_checkpoint(baseline, cfg.model)
    runners[BASELINE] = eager_runner(adapter, model, cfg.export)
    test = DetectionSet(json.loads(manifest.read_text()), "test", model.cfg.input_size)
    x = test.batch(np.arange(batch) % len(test))
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-") as work:
        if uncompressed:  # what a user gets with no pipeline, on each CPU runtime
            fp32 = read_reference(reference)["onnx"]  # exported once, by the reference stage
            variants = {
                "onnxruntime": cfg.build_engine,
                "openvino": cfg.build_engine.model_copy(update={"openvino_precision": "f32"}),
                "openvino_bf16": cfg.build_engine.model_copy(update={"openvino_precision": "bf16"}),
            }
            if "litert" in runners:  # its float32 conversion of the same model
                variants["litert"] = cfg.build_engine
            for name, engine_cfg in variants.items():
                target = name.removesuffix("_bf16")
                folder = Path(work) / name
                folder.mkdir()
                get(target).build(fp32, folder, engine_cfg)
                runners[f"fp32_uncompressed_{name}"] = get(target).load(folder, engine_cfg)
        times = time_blocks(runners, x, warmup=10, runs=runs, rounds=rounds)
    stats = {k: latency_stats(v, batch) for k, v in times.items()}
    eager = stats[BASELINE]["latency_ms_p50"]
    result = {
        "batch": batch,
        "threads": cfg.build_engine.threads,
        "runs": runs,
        "rounds": rounds,
        "runtimes": {
            k: {**v, "speedup_vs_eager": eager / v["latency_ms_p50"]} for k, v in stats.items()
        },
        "skipped": skipped,
    }
    if uncompressed:
        ort_fp32 = stats["fp32_uncompressed_onnxruntime"]["latency_ms_p50"]
        result["openvino_f32_vs_onnxruntime_fp32"] = (
            stats["fp32_uncompressed_openvino"]["latency_ms_p50"] / ort_fp32
        )
        result["openvino_bf16_vs_onnxruntime_fp32"] = (
            stats["fp32_uncompressed_openvino_bf16"]["latency_ms_p50"] / ort_fp32
        )
        for target in runners.keys() & set(cfg.build_engine.targets):
            same = stats[f"fp32_uncompressed_{target}"]["latency_ms_p50"]
            result["runtimes"][target]["speedup_vs_fp32_same_runtime"] = (
                same / stats[target]["latency_ms_p50"]
            )
    return result


def show(result: dict) -> None:
    """Print `run`'s result as a table: p50/p95/p99, throughput and the ratio to eager."""
    table = Table(title=f"batch {result['batch']}, {result['threads']} threads")
    for col in ("runtime", "p50 ms", "p95 ms", "p99 ms", "img/s", "vs eager"):
        table.add_column(col, no_wrap=col == "runtime")
    for k, v in result["runtimes"].items():
        table.add_row(
            k,
            f"{v['latency_ms_p50']:.3f}",
            f"{v['latency_ms_p95']:.3f}",
            f"{v['latency_ms_p99']:.3f}" if "latency_ms_p99" in v else "n/a (< 200 runs)",
            f"{v['throughput_ips']:.0f}",
            f"{v['speedup_vs_eager']:.2f}x",
        )
    for k, why in result["skipped"].items():
        table.add_row(k, why, "", "", "", "")
    Console().print(table)
