"""One recipe of a fanned-out sweep, as a worker runs it: its own workspace, a DVC experiment, and
its KPIs sent to the shared MLflow server.

The sweep (flows/sweep.py) submits one flow run of this flow per recipe to a deployment on a work
pool; whichever worker takes the run clones the project's git repository at the sweep's baseline
commit into a scratch directory, `dvc pull`s the baseline's outputs from the shared DVC remote
(so only the stages the recipe's params touch re-run), runs the recipe as
`dvc exp run -n <name> -S ...`, pushes the experiment back (`dvc exp push`: its git ref to the
repository, its outputs to the remote) and logs the target's KPIs as an MLflow run tagged with the
sweep's id. Workers on several machines therefore share nothing but the git repository, the
DVC remote and the MLflow server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.project import run_dvc
from tasks.harness.config import load_params
from tasks.harness.errors import StageFailed

ROLE = "sweep-recipe"  # MLflow tag `shrinkflow.role` of a recipe's KPI run
SWEEP_TAG = "shrinkflow.sweep"
RECIPE_TAG = "shrinkflow.recipe"
KPIS = ("map50", "delta_map50", "map50_95", "latency_ms_p50", "latency_ms_p95", "size_mb", "macs")


def yaml_value(v: Any) -> str:
    """What `-S key=value` parses back to the same value (Hydra override grammar)."""
    return json.dumps(v) if isinstance(v, bool | list) else str(v)


def overrides(recipe: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments of a recipe."""
    return [a for k, v in recipe.items() for a in ("-S", f"{k}={yaml_value(v)}")]


def git(cwd: Path, *args: str) -> str:
    """`git <args>` in `cwd`; its stdout. Raises StageFailed with git's error."""
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise StageFailed(f"git {' '.join(args)} failed in {cwd}:\n{out.stderr[-3000:]}")
    return out.stdout.strip()


@task(name="clone-baseline", cache_policy=NO_CACHE)
def clone(git_url: str, commit: str, dest: Path) -> Path:
    """A fresh checkout of `git_url` at `commit` in `dest`, its baseline outputs pulled."""
    logger = get_run_logger()
    git(dest.parent, "clone", "-q", "--no-checkout", git_url, dest.name)
    git(dest, "checkout", "-q", commit)
    pulled = run_dvc(dest, "pull", "--allow-missing", timeout_s=1800)
    if pulled.returncode != 0:  # missing outputs are re-made by the experiment; say so
        logger.warning("dvc pull of the baseline failed; its stages re-run:\n%s", pulled.tail())
    return dest


@task(name="run-experiment", cache_policy=NO_CACHE)
def run_experiment(ws: Path, name: str, recipe: dict, env: dict[str, str], timeout_s: float):
    """`dvc exp run -n <name> -S ...` in the workspace; its output goes to the run's log."""
    logger = get_run_logger()
    result = run_dvc(
        ws, "exp", "run", "-n", name, *overrides(recipe), env=env, timeout_s=timeout_s,
        on_line=logger.info,
    )  # fmt: skip
    if result.timed_out:
        raise StageFailed(f"recipe {name} timed out after {timeout_s:g} s:\n{result.tail()}")
    if result.returncode != 0:
        raise StageFailed(f"recipe {name} {recipe} failed:\n{result.tail()}")


@task(name="push-experiment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def push_experiment(ws: Path, name: str) -> None:
    """`dvc exp push origin <name>`: the experiment's ref to the repository, outputs to the
    remote, so `dvc exp pull`/`dvc exp show` in the project see it."""
    result = run_dvc(ws, "exp", "push", "origin", name, timeout_s=1800)
    if result.returncode != 0:
        raise StageFailed(f"dvc exp push origin {name} failed:\n{result.tail()}")


def kpis(ws: Path, target: str) -> dict[str, Any]:
    """The target's KPIs from the experiment's `artifacts/evaluate/<target>/metrics.json`."""
    path = ws / "artifacts" / "evaluate" / target / "metrics.json"
    if not path.exists():
        raise StageFailed(f"recipe produced no {path.relative_to(ws)}")
    m = json.loads(path.read_text())
    return {"status": m.get("status", "ok"), **{k: m.get(k) for k in KPIS}}


@task(name="log-kpis", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def log_kpis(uri: str, experiment: str, sweep_id: str, name: str, recipe: dict, row: dict) -> str:
    """One MLflow run per recipe (role `sweep-recipe`, tagged with the sweep): the recipe as
    params, the KPIs as metrics, the full row as `kpis.json`. Returns its run id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from tasks.harness.tracking import ensure_experiment

    client = MlflowClient(uri)
    tags = {
        "shrinkflow.role": ROLE,
        SWEEP_TAG: sweep_id,
        RECIPE_TAG: name,
        "shrinkflow.status": str(row["status"]),
        "shrinkflow.host": socket.gethostname(),
        "prefect.flow_run_id": str(flow_run.id),
    }
    run = client.create_run(ensure_experiment(client, experiment), run_name=name, tags=tags)
    rid = run.info.run_id
    for k, v in recipe.items():
        client.log_param(rid, k, v)
    for k in KPIS:
        if isinstance(row.get(k), int | float):
            client.log_metric(rid, k, float(row[k]))
    client.log_dict(rid, row, "kpis.json")
    client.set_terminated(rid)
    return rid


@flow(name="sweep-recipe")
def recipe(
    name: str,
    recipe: dict[str, Any],
    commit: str,
    sweep_id: str,
    git_url: str | None = None,
    project: str = ".",
    target: str = "onnxruntime",
    mlflow_tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Run one recipe of a sweep in a scratch clone of the project; report its KPIs to MLflow.

    Args:
        name: the experiment name (`dvc exp run -n`), unique in the sweep.
        recipe: params key -> value (`dvc exp run -S key=value`).
        commit: the baseline commit the sweep started from.
        sweep_id: tags the recipe's MLflow run, so the sweep finds its KPIs.
        git_url: the repository to clone and push the experiment to (default: `project`).
        project: the deployment's checkout (its params.yaml gives the experiment name and the
            timeout); the scratch clone is made from `git_url`.
        target: the engine whose KPIs are reported.
        mlflow_tracking_uri: the shared MLflow server (else MLFLOW_TRACKING_URI).

    Returns:
        The recipe's row: `experiment`, the recipe's keys, `status` and the KPIs.
    """
    root = Path(project).resolve()
    params = load_params(root / "params.yaml")
    uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise StageFailed("a fanned-out recipe needs a shared MLflow server (mlflow_tracking_uri)")
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        ws = clone(git_url or str(root), commit, Path(tmp) / "ws")
        run_experiment(ws, name, recipe, {"MLFLOW_TRACKING_URI": uri}, params.flow.timeout_s)
        row = {"experiment": name, **recipe, **kpis(ws, target)}
        push_experiment(ws, name)
    row["mlflow_run"] = log_kpis(uri, params.project.mlflow_experiment, sweep_id, name, recipe, row)
    get_run_logger().info("recipe %s on %s: %s", name, socket.gethostname(), row)
    return row
