"""The fanned-out sweep's steps: the shared baseline, one flow run per recipe on a work pool,
waiting for them and collecting their KPIs from MLflow (see flows/sweep.py, which runs them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.project import run_dvc
from flows.recipe import KPIS, ROLE, SWEEP_TAG, git
from tasks.harness.errors import ConfigError


@task(name="share-baseline", cache_policy=NO_CACHE)
def share_baseline(root: Path, timeout_s: float) -> str:
    """The committed baseline the workers start from: its commit, its outputs pushed to the DVC
    remote (`dvc push`) so workers re-run only what their recipe touches.

    Raises:
        ConfigError: params.yaml, dvc.yaml or dvc.lock differ from the commit (workers would not
            see the change).
    """
    dirty = git(root, "status", "--porcelain", "--", "params.yaml", "dvc.yaml", "dvc.lock")
    if dirty:
        raise ConfigError(
            f"{root}: commit the baseline before a fanned-out sweep (workers clone the commit):\n"
            + dirty
        )
    commit = git(root, "rev-parse", "HEAD")
    logger = get_run_logger()
    pushed = run_dvc(root, "push", timeout_s=timeout_s)
    if pushed.returncode != 0:  # the recipes still run, re-making what is missing
        logger.warning("dvc push of the baseline failed; workers re-run its stages:\n%s",
                       pushed.tail())  # fmt: skip
    return commit


@task(name="submit-recipes", cache_policy=NO_CACHE)
def submit(deployment: str, named: dict[str, dict[str, Any]], common: dict[str, Any]) -> dict:
    """One flow run of `deployment` per recipe, returned at once (`timeout=0`): {name: id}."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    ids = {}
    for name, recipe in named.items():
        run = run_deployment(
            deployment,
            parameters={"name": name, "recipe": recipe, **common},
            flow_run_name=name,
            timeout=0,
        )
        ids[name] = run.id
        logger.info("submitted %s to %s: %s (flow run %s)", name, deployment, recipe, run.id)
    return ids


@task(name="wait-for-recipes", cache_policy=NO_CACHE)
def wait_all(ids: dict[str, Any], timeout_s: float, poll_s: float = 5.0) -> dict[str, dict]:
    """Wait until every recipe's flow run is final: {name: {flow_run, state, message}}. Runs
    still going after `timeout_s` are reported as they are."""
    import time

    from prefect.client.orchestration import get_client

    logger = get_run_logger()
    deadline = time.monotonic() + timeout_s
    final: dict[str, dict] = {}

    def outcome(run) -> dict:
        state = run.state
        return {
            "flow_run": str(run.id),
            "state": state.type.value if state else "UNKNOWN",
            "message": (state.message or "") if state else "",
            "final": bool(state and state.is_final()),
        }

    with get_client(sync_client=True) as client:
        while True:
            for name, fid in ids.items():
                if name not in final:
                    got = outcome(client.read_flow_run(fid))
                    if got["final"]:
                        final[name] = got
                        logger.info("recipe %s: %s", name, got["state"])
            if len(final) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        for name, fid in ids.items():
            final.setdefault(name, outcome(client.read_flow_run(fid)))
    return final


@task(name="collect-kpis-from-mlflow", cache_policy=NO_CACHE)
def collect_fanned(
    uri: str, experiment: str, sweep_id: str, named: dict[str, dict[str, Any]], runs: dict
) -> list[dict[str, Any]]:
    """One row per recipe, from the KPI run its worker logged to MLflow (failed flow runs say
    why)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    logged = {}
    if exp is not None:
        for r in client.search_runs(
            [exp.experiment_id],
            f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`shrinkflow.role` = '{ROLE}'",
        ):
            logged[r.info.run_name] = r
    rows = []
    for name, recipe in named.items():
        row: dict[str, Any] = {"experiment": name, **recipe}
        outcome = runs[name]
        found = logged.get(name)
        if found is None or outcome["state"] != "COMPLETED":
            row["status"] = f"failed: {outcome['state']}: {outcome['message'][-300:]}".rstrip(": ")
        else:
            row["status"] = found.data.tags.get("shrinkflow.status", "ok")
            row |= {k: found.data.metrics.get(k) for k in KPIS}
        row["flow_run"] = outcome["flow_run"]
        rows.append(row)
    return rows
