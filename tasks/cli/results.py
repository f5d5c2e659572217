"""Where a benchmark's result goes: its JSON file, the README's measured tables re-rendered from
it (tasks/cli/measured.py), and an MLflow run tagged `shrinkflow.role=benchmark`."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.cli import measured
from tasks.harness.io import write_json, write_text

README = Path("README.md")


def refresh_readme(readme: Path = README) -> bool:
    """Re-render the README's measured tables from artifacts/ (tasks/cli/measured.py); every
    benchmark command calls it after writing its file, so the README never quotes a stale one.
    Returns whether the README changed; False without a README (run outside the project)."""
    if not readme.is_file():
        return False
    old = readme.read_text(encoding="utf-8")
    new = measured.render(old, readme.resolve().parent)
    if new != old:
        write_text(readme, new)
    return new != old


def log_to_mlflow(name: str, metrics: dict, files: list[Path]) -> None:
    """One MLflow run `name` in the project's experiment with `metrics` and `files` logged."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.harness.config import load_params
    from tasks.harness.tracking import ensure_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = ensure_experiment(MlflowClient(), load_params().project.mlflow_experiment)
    with mlflow.start_run(
        experiment_id=experiment, run_name=name, tags={"shrinkflow.role": "benchmark"}
    ):
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))


def publish(path: Path, result: dict, run_name: str, metrics: dict, *, mlflow: bool = True) -> None:
    """Write `result` to `path`, re-render the README's tables, and (with `mlflow`) log
    `metrics` and the file to the MLflow run `run_name`."""
    write_json(path, result)
    refresh_readme()
    if mlflow:
        log_to_mlflow(run_name, metrics, [path])
