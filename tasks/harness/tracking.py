"""MLflow tracking: one parent run per pipeline execution, one child run per stage.

DVC runs every stage in its own process, so the stages of one `dvc repro` find their shared parent
run by an *execution id*: `SHRINKFLOW_EXECUTION_ID` when set (the Prefect flow sets it to its flow
run id), else the pid and start time of the `dvc` process the stage descends from, else a fresh id
(a stage run by hand gets a parent of its own). The parent carries the lineage tags.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"
EXECUTION_TAG = "shrinkflow.execution_id"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _proc_stat(pid: int) -> list[str]:
    # /proc/<pid>/stat: "pid (comm) state ppid ... starttime(22nd)"; comm may hold spaces.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _is_dvc(pid: int) -> bool:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
    names = [Path(a.decode(errors="replace")).name for a in argv if a]
    return "dvc" in names[:2] or names[1:3] == ["-m", "dvc"]


def execution_id() -> str:
    """Identify the pipeline execution this stage belongs to (see module docstring)."""
    if eid := os.environ.get("SHRINKFLOW_EXECUTION_ID"):
        return eid
    try:
        pid = os.getppid()
        while pid > 1:
            stat = _proc_stat(pid)
            if _is_dvc(pid):
                return f"dvc-{socket.gethostname()}-{pid}-{stat[19]}"
            pid = int(stat[1])
    except (OSError, ValueError, IndexError):
        pass  # no /proc (not Linux) or the process vanished: this stage stands alone
    return f"standalone-{uuid.uuid4().hex[:12]}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (MLflow's client would retry for
    minutes). Raises ConnectionError naming `uri`; HTTP error statuses count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        pass  # something answers (an auth proxy, an older server): let MLflow's client decide
    except OSError as e:
        raise ConnectionError(f"no MLflow server answers at {uri}: {e}") from e


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def ensure_experiment(client, name: str) -> str:
    """The id of experiment `name`, created on first use. With a local store (the default
    SQLite file) its artifacts go to `mlartifacts/` in the repo rather than MLflow's `mlruns/`."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith(("sqlite:", "file:")):
        location = Path(ARTIFACT_DIR).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def pipeline_run(client, experiment_id: str, execution_id: str) -> str:
    """The id of the parent run of pipeline execution `execution_id`, created on first use."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{EXECUTION_TAG}` = '{execution_id}' "
        "and tags.`shrinkflow.role` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {execution_id}",
        tags={EXECUTION_TAG: execution_id, "shrinkflow.role": "pipeline"},
    )
    return run.info.run_id


class Tracker:
    """The MLflow side of one stage process: opens the child run under the execution's parent."""

    def __init__(self, stage: str, experiment: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        self.uri = tracking_uri()
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.stage = stage
        self.experiment_id = ensure_experiment(self.client, experiment)
        self.execution_id = execution_id()
        self.parent_id = self._parent()
        self.run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=stage,
            parent_run_id=self.parent_id,
            tags={"shrinkflow.stage": stage, EXECUTION_TAG: self.execution_id},
        )

    def _parent(self) -> str:
        return pipeline_run(self.client, self.experiment_id, self.execution_id)

    def log_params(self, params: dict) -> None:
        self.mlflow.log_params({k: str(v) for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        numeric, text = {}, {}
        for k, v in flatten(metrics).items():
            if isinstance(v, int | float):  # bool is an int
                numeric[k] = float(v)
            elif v is not None:
                text[k] = str(v)
        if numeric:
            self.mlflow.log_metrics(numeric, step=step)
        if text:
            self.mlflow.set_tags({f"result.{k}": v[:5000] for k, v in text.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def finish(self, status: str, lineage: dict[str, str]) -> None:
        """End the child run and stamp the parent with the lineage of the latest stage."""
        self.mlflow.end_run(status=status)
        for k, v in lineage.items():
            self.client.set_tag(self.parent_id, k, v)
        self.client.set_terminated(self.parent_id, status=status)
