"""What every stage entry point shares: logging, params validation, MLflow child run, exit codes.

    with stage_entry("train", params_path) as ctx:
        result = run(ctx.params.train, ...)
        ctx.log_metrics(result)

A `ShrinkflowError` becomes its message on stderr and its exit status (2 for a bad params.yaml),
never a stack trace; the MLflow child and parent runs are marked FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from rich.logging import RichHandler

from tasks.harness.config import Params, load_params
from tasks.harness.errors import ShrinkflowError
from tasks.harness.io import md5_file

log = logging.getLogger("shrinkflow")

# The params.yaml sections each stage's code reads: they must be in the file (no stage runs on
# built-in defaults, so an empty or truncated params.yaml cannot pass a gate). Keyed by the stage
# name before any `@item`.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "ingest": ("dataset", "data", "label_qa"),
    "label_qa": ("label_qa", "model", "train", "project"),
    "train": ("model", "train"),
    "reference": ("export", "model", "train"),
    "prune": ("prune", "model", "train", "build_engine"),
    "distill": ("distill", "model", "train"),
    "export": ("export", "model", "train"),
    "quantize": ("quantize", "model", "train", "distill", "export", "build_engine"),
    "build_engine": ("build_engine",),
    "evaluate": ("evaluate", "model", "train", "export", "build_engine"),
    "variants": ("variants", "quantize", "model", "train", "export", "evaluate", "build_engine"),
    "compare": ("build_engine",),
    "promote": ("promote", "project", "build_engine", "export"),
}


@dataclass
class StageContext:
    params: Params
    tracker: object  # tasks.harness.tracking.Tracker (imported lazily: mlflow is slow to import)

    def log_params(self, cfg: BaseModel | dict) -> None:
        self.tracker.log_params(cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def log_epoch(self, row: dict) -> None:
        """A training-curve row ({epoch, ...}) as MLflow metrics at step = epoch."""
        self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)


def required_sections(stage: str) -> tuple[str, ...]:
    """The sections `stage` (or `stage@item`) reads; a stage not listed reads its own section."""
    base = stage.split("@")[0]
    return STAGE_SECTIONS.get(base, (base,) if base in Params.model_fields else ())


def setup_logging() -> None:
    """Our loggers at INFO (or SHRINKFLOW_LOG_LEVEL); third-party chatter at WARNING."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for name in ("shrinkflow", "tasks", "flows"):
        logging.getLogger(name).setLevel(os.environ.get("SHRINKFLOW_LOG_LEVEL", "INFO"))


def lineage_tags(params: Params, params_path: Path) -> dict[str, str]:
    """The pipeline-run lineage: git commit, dvc.lock, params and data hashes."""
    from tasks.harness.tracking import git_commit

    data = Path("artifacts/ingest/manifest.json")  # MD5 of every image and label (ingest)
    lock = Path("dvc.lock")
    return {
        "git_commit": git_commit(),
        "dvc_lock_md5": md5_file(lock) if lock.exists() else "none",
        "params_md5": md5_file(params_path),
        "data_md5": md5_file(data) if data.exists() else "none",
    }


def fail(err: ShrinkflowError) -> None:
    """Print an expected error for the user and exit with its status."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(err.exit_code)


def _finish_failed(tracker, params: Params, params_path: Path) -> None:
    """Mark the runs FAILED; if MLflow itself is what failed, say so and keep the first error."""
    try:
        tracker.finish("FAILED", lineage_tags(params, params_path))
    except Exception as e:  # noqa: BLE001  (the stage's own error is the one to report)
        log.warning("could not mark the MLflow run FAILED at %s: %s", tracker.uri, e)


@contextlib.contextmanager
def stage_entry(stage: str, params_path: Path) -> Iterator[StageContext]:
    """Validate params, open the MLflow child run, and map errors to exit statuses."""
    setup_logging()
    try:
        params = load_params(params_path, required_sections(stage))
    except ShrinkflowError as e:
        fail(e)
    from tasks.harness.tracking import Tracker, tracking_uri

    try:
        tracker = Tracker(stage, params.project.mlflow_experiment)
    except Exception as e:  # any failure to reach the store: say where we tried
        fail(ShrinkflowError(f"MLflow tracking at {tracking_uri()} is not usable: {e}"))
    log.info(
        "stage %s: MLflow run %s (parent %s)", stage, tracker.run.info.run_id, tracker.parent_id
    )
    try:
        yield StageContext(params, tracker)
    except ShrinkflowError as e:
        _finish_failed(tracker, params, params_path)
        fail(e)
    except BaseException:
        _finish_failed(tracker, params, params_path)
        raise
    tracker.finish("FINISHED", lineage_tags(params, params_path))
