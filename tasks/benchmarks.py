"""Benchmarks whose results are written to files and MLflow (never asserted by timed tests).

    python -m tasks.benchmarks pipeline --profile default   # full `dvc repro` from scratch

`pipeline` copies the project into a temp folder (no DVC cache, its own MLflow store), times a
cold `dvc repro` and a second, no-op `dvc repro`, and records the KPIs that run produced, in
`artifacts/bench/pipeline-<profile>.json` and an MLflow run tagged `shrinkflow.role=benchmark`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import typer

from tasks.cli import setup_logging
from tasks.errors import ShrinkflowError
from tasks.io import write_json
from tasks.project import PROFILES, copy_project, dvc, profile_params

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, help=__doc__)


@app.callback()
def _group() -> None:
    """Keep `pipeline` a named sub-command (more benchmarks join it)."""


def _timed_repro(proj: Path, env: dict) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    proc = dvc(proj, "repro", env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ShrinkflowError(f"dvc repro failed in {proj}:\n{proc.stdout[-3000:]}{proc.stderr}")
    return wall, re.findall(r"Running stage '([^']+)'", proc.stdout)


def pipeline_benchmark(profile: str, work: Path) -> dict:
    """Time a cold and a no-op `dvc repro` of a fresh project copy under `work`."""
    params = profile_params(profile)
    proj = copy_project(work / "proj", params)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    cold_s, stages = _timed_repro(proj, env)
    noop_s, rerun = _timed_repro(proj, env)
    stage_metrics = {
        p.parent.relative_to(proj / "artifacts").as_posix(): json.loads(p.read_text())
        for p in sorted((proj / "artifacts").rglob("metrics.json"))
    }
    return {
        "profile": profile,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "dvc_repro_cold_s": cold_s,
        "dvc_repro_noop_s": noop_s,
        "stages_run": stages,
        "stages_rerun_on_noop": rerun,
        "kpis": stage_metrics,
    }


@app.command()
def pipeline(
    profile: str = typer.Option("default", help=f"one of {', '.join(PROFILES)}"),
    out: Path = typer.Option(Path("artifacts/bench"), help="folder for the result JSON"),
) -> None:
    """Wall time of the whole pipeline from scratch, and of a no-op `dvc repro`."""
    setup_logging()
    if profile not in PROFILES:
        choices = ", ".join(PROFILES)
        raise typer.BadParameter(f"unknown profile {profile!r}; choose one of {choices}")
    with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-") as tmp:
        result = pipeline_benchmark(profile, Path(tmp))
    path = out / f"pipeline-{profile}.json"
    write_json(path, result)
    _log_to_mlflow(result, path)
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


def _log_to_mlflow(result: dict, path: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.config import load_params
    from tasks.tracking import ensure_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = ensure_experiment(MlflowClient(), load_params().project.mlflow_experiment)
    with mlflow.start_run(
        experiment_id=experiment,
        run_name=f"bench pipeline ({result['profile']})",
        tags={"shrinkflow.role": "benchmark"},
    ):
        mlflow.log_metrics(
            {
                "dvc_repro_cold_s": result["dvc_repro_cold_s"],
                "dvc_repro_noop_s": result["dvc_repro_noop_s"],
            }
        )
        mlflow.log_artifact(str(path))


if __name__ == "__main__":
    app()
