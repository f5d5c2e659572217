"""Benchmarks whose results are written to files and MLflow (never asserted by timed tests).

    shrinkflow bench                              # every built engine beside FP32 eager
    shrinkflow bench-pipeline --profile default   # full `dvc repro` from scratch
    shrinkflow bench-sizes                        # trained vs compressed at 128 and 256 px
    shrinkflow bench-input-cache                  # memory of 5,000 640x480 JPEGs at 320 px

(`shrinkflow` is this module's console script; `python -m tasks.cli.app ...` is the same.)

`bench` loads every engine that `build_engine` built (skipped targets are listed with their
reason), FP32 PyTorch eager of the trained model and its ONNX from the reference stage on each
CPU runtime, times them at one batch size in shuffled, alternating blocks with warm-up and a
fixed thread count, and prints each one's ratio to eager.

`pipeline` copies the project into a temp folder (no DVC cache, its own MLflow store), times a
cold `dvc repro` and a second, no-op `dvc repro`, and records each stage's time (from its MLflow
run) and the KPIs that run produced, in
`artifacts/bench/pipeline-<profile>.json` and an MLflow run tagged `shrinkflow.role=benchmark`.

`input-cache` writes N synthetic JPEGs (drawn rectangles) to a temp folder, decodes them into
the input cache (tasks/preprocess/input_cache.py) at one input size in a fresh process, makes
one pass over every batch as training does, and records that process's peak RSS, its anonymous
memory after the pass (what the kernel cannot drop: the cache's pages are file-backed), the
cache file's size and the decode time, beside what the set would take in RAM at native size, in
`artifacts/bench/input-cache.json`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import typer

from tasks.cli import measured
from tasks.cli.results import README, publish, refresh_readme
from tasks.cli.review import register as register_review
from tasks.cli.runs import input_cache_benchmark, pipeline_benchmark
from tasks.harness.errors import ShrinkflowError
from tasks.harness.io import write_json
from tasks.harness.project import PROFILES
from tasks.harness.stage import fail, setup_logging

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, help=__doc__)
register_review(app)  # shrinkflow review / promote / reject / rollback


@app.callback()
def _group() -> None:
    """Shrinkflow benchmarks: results go to artifacts/bench/ and MLflow."""


@app.command("bench-pipeline")
def pipeline(
    profile: str = typer.Option("default", help=f"one of {', '.join(PROFILES)}"),
    out: Path = typer.Option(Path("artifacts/bench"), help="folder for the result JSON"),
    keep: Path | None = typer.Option(
        None, help="run in this new folder and keep it (its artifacts/ and dvc.lock are the run's)"
    ),
) -> None:
    """Wall time of the whole pipeline from scratch, and of a no-op `dvc repro`."""
    setup_logging()
    if profile not in PROFILES:
        choices = ", ".join(PROFILES)
        raise typer.BadParameter(f"unknown profile {profile!r}; choose one of {choices}")
    if keep is not None:
        if keep.exists():
            raise typer.BadParameter(f"--keep: {keep} exists; name a new folder")
        result = pipeline_benchmark(profile, keep)
    else:
        with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-") as tmp:
            result = pipeline_benchmark(profile, Path(tmp))
    path = out / f"pipeline-{profile}.json"
    publish(
        path,
        result,
        f"bench pipeline ({profile})",
        {k: result[k] for k in ("dvc_repro_cold_s", "dvc_repro_noop_s")},
    )
    ev = result["kpis"].get("evaluate/onnxruntime", {})
    log.info(
        "pipeline (%s): cold %.1f s, no-op %.2f s, map50 %.4f, map50_95 %.4f -> %s",
        profile,
        result["dvc_repro_cold_s"],
        result["dvc_repro_noop_s"],
        ev.get("map50", float("nan")),
        ev.get("map50_95", float("nan")),
        path,
    )


@app.command("bench")
def engines(
    params: Path = typer.Option(Path("params.yaml")),
    engines_dir: Path = typer.Option(Path("artifacts/build_engine"), "--engines"),
    baseline: Path = typer.Option(Path("artifacts/train/model.pt")),
    reference: Path = typer.Option(
        Path("artifacts/reference"), help="the reference stage's folder (the trained FP32 ONNX)"
    ),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    batch: int = typer.Option(1, min=1),
    runs: int = typer.Option(300, min=1, help="timed calls per runtime, over all rounds"),
    rounds: int = typer.Option(5, min=1),
    uncompressed: bool = typer.Option(
        True, help="also build the trained FP32 model for ONNX Runtime, OpenVINO f32 and bf16"
    ),
    out: Path = typer.Option(Path("artifacts/bench")),
) -> None:
    """Every built engine and FP32 PyTorch eager, side by side, in one process."""
    from tasks.cli import bench_engines
    from tasks.harness.config import load_params

    setup_logging()
    result = bench_engines.run(
        load_params(params),
        engines_dir=engines_dir,
        baseline=baseline,
        reference=reference,
        manifest=manifest,
        batch=batch,
        runs=runs,
        rounds=rounds,
        uncompressed=uncompressed,
    )
    bench_engines.show(result)
    publish(
        out / f"engines-b{batch}.json",
        result,
        f"bench engines (batch {batch})",
        {
            f"{k}.{m}": v[m]
            for k, v in result["runtimes"].items()
            for m in ("latency_ms_p50", "speedup_vs_eager")
        },
    )


@app.command("bench-ultralytics")
def ultralytics_reference(
    params: Path = typer.Option(Path("params.yaml")),
    checkpoint: Path = typer.Option(Path("artifacts/train/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    engines_dir: Path = typer.Option(Path("artifacts/build_engine")),
    runs: int = typer.Option(300, min=1),
    rounds: int = typer.Option(5, min=1),
    out: Path = typer.Option(Path("artifacts/bench/ultralytics-reference.json")),
) -> None:
    """Ultralytics' own OpenVINO FP32 / INT8 export of the trained YOLO (family yolo), timed
    in one process beside the pipeline's built CPU engines, on the same letterboxed test split."""
    from tasks.engines import get
    from tasks.harness.config import load_params
    from tasks.models.ultralytics_ref import bench_reference, reference_cfg

    setup_logging()
    cfg = load_params(params)
    others = {}
    for target in cfg.build_engine.targets:
        folder = engines_dir / target / "engine"
        facts = json.loads((folder / "engine.json").read_text()) if folder.exists() else {}
        if facts.get("status") == "ok":
            others[f"shrinkflow_{target}"] = get(target).load(folder, cfg.build_engine)
    bench_reference(
        checkpoint, manifest, out, reference_cfg(cfg, runs=runs, rounds=rounds), others=others
    )


@app.command("bench-label-qa")
def label_qa_bench(
    params: Path = typer.Option(Path("params.yaml")),
    rate: float = typer.Option(0.05, min=0.0, max=0.2, help="injected share of boxes per kind"),
    epochs: int = typer.Option(30, min=1, help="detector training epochs (clean/noisy/cleaned)"),
    train: bool = typer.Option(True, help="also train on clean, noisy and cleaned labels"),
    clean_check: bool = typer.Option(True, help="also run label QA on the clean data"),
    dataset: str = typer.Option("digits", help="digits (params.data) or shapes (class = colour)"),
    out: Path = typer.Option(Path("artifacts/bench")),
) -> None:
    """Label QA against injected noise: recall/precision per kind, stage cost, mAP recovery."""
    if dataset not in ("digits", "shapes"):
        raise typer.BadParameter(f"unsupported dataset {dataset!r}; choose one of digits, shapes")
    from tasks.harness.config import load_params
    from tasks.label_qa.bench import run_benchmark

    setup_logging()
    cfg = load_params(params)
    path = out / ("label-qa-default.json" if dataset == "digits" else f"label-qa-{dataset}.json")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-label-qa-") as tmp:
        result = run_benchmark(
            cfg,
            Path(tmp),
            rate=rate,
            epochs=epochs,
            train=train,
            clean_check=clean_check,
            on_partial=lambda r: write_json(path, {**r, "machine": machine, "partial": True}),
            dataset=dataset,
        )
    result["machine"] = machine
    flat = {
        f"recall.{k}": v["recall"]
        for k, v in result["detection"]["kinds"].items()
        if v["recall"] is not None
    }
    flat |= {f"precision.{k}": v["precision"] for k, v in result["detection"]["rules"].items()}
    flat |= {f"stage_s.{k}": v for k, v in result["stage_s"].items()}
    if "training" in result:
        flat |= {f"map50.{k}": v["map50"] for k, v in result["training"]["test"].items()}
    publish(path, result, "bench label_qa", flat)
    log.info("label QA benchmark -> %s", path)


@app.command("bench-input-cache")
def input_cache(
    images: int = typer.Option(5000, min=1, help="synthetic JPEGs to generate"),
    width: int = typer.Option(640, min=16),
    height: int = typer.Option(480, min=16),
    input_size: int = typer.Option(320, min=16, help="the model input side they decode to"),
    batch: int = typer.Option(32, min=1, help="images per batch in the pass over the set"),
    mlflow: bool = typer.Option(True, help="also log the figures to an MLflow run"),
    out: Path = typer.Option(Path("artifacts/bench"), help="folder for input-cache.json"),
) -> None:
    """Memory and decode time of the input cache on N synthetic WxH JPEGs at one input size."""
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-input-cache-") as tmp:
        result = input_cache_benchmark(images, width, height, input_size, batch, Path(tmp))
    path = out / "input-cache.json"
    keys = ("decode_s", "peak_rss_mb", "anon_mb", "cache_file_mb", "native_uint8_mb")
    publish(path, result, "bench input cache", {k: result[k] for k in keys}, mlflow=mlflow)
    log.info(
        "input cache: %d images %dx%d at %d px: decode %.1f s, cache file %.0f MB, peak RSS "
        "%.0f MB, anonymous %.0f MB after one pass (native size in RAM: %.0f MB) -> %s",
        images,
        width,
        height,
        input_size,
        result["decode_s"],
        result["cache_file_mb"],
        result["peak_rss_mb"],
        result["anon_mb"],
        result["native_uint8_mb"],
        path,
    )


@app.command("bench-sizes")
def sizes(
    params: Path = typer.Option(Path("params.yaml")),
    trained: Path = typer.Option(Path("artifacts/train/model.pt")),
    compressed: Path = typer.Option(Path("artifacts/distill/model.pt")),
    quantize_report: Path = typer.Option(Path("artifacts/quantize/report.json")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    size: list[str] = typer.Option(
        ["128", "256"],
        help="input sizes to time, each a side (128) or WIDTHxHEIGHT (96x64), a multiple of the "
        "model family's stride like train.input_size (repeat the option)",
    ),
    runs: int = typer.Option(200, min=1, help="timed calls per variant and size"),
    rounds: int = typer.Option(5, min=1),
    out: Path = typer.Option(Path("artifacts/bench")),
) -> None:
    """Batch-1 latency of the trained and the compressed model at several input sizes."""
    from tasks.cli import bench_sizes
    from tasks.harness.config import load_params

    setup_logging()
    result = bench_sizes.run(
        load_params(params),
        trained=trained,
        compressed=compressed,
        quantize_report=quantize_report,
        manifest=manifest,
        sizes=size,
        runs=runs,
        rounds=rounds,
    )
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    bench_sizes.show(result)
    publish(
        out / "sizes-b1.json",
        result,
        "bench sizes (batch 1)",
        {
            f"{s}px.{k}": v
            for s, r in result["sizes"].items()
            for k, v in {
                **r["ratios"],
                **{f"{n}.latency_ms_p50": m["latency_ms_p50"] for n, m in r["latency"].items()},
            }.items()
        },
    )


@app.command("readme")
def readme_tables(
    check: bool = typer.Option(False, help="exit 1 if the README and artifacts/ disagree"),
    readme: Path = typer.Option(README, help="the README to render"),
) -> None:
    """Render the README's measured tables from artifacts/ (between `<!-- measured:NAME -->`
    markers); `--check` changes nothing and fails when they are stale."""
    setup_logging()
    if check:
        old = readme.read_text(encoding="utf-8")
        if measured.render(old, readme.resolve().parent) != old:
            log.error("%s: measured tables differ from artifacts/: run `shrinkflow readme`", readme)
            raise typer.Exit(1)
        return
    log.info("%s: %s", readme, "re-rendered" if refresh_readme(readme) else "already current")


def main() -> None:
    """The `shrinkflow` console script: an expected error (a bad params.yaml, a missing
    artifact) is one `error:` line and its exit status, in every command, never a traceback."""
    try:
        app()
    except ShrinkflowError as e:
        fail(e)


if __name__ == "__main__":
    main()
