"""The pipeline flow: the DVC DAG run stage by stage as Prefect tasks.

Each stage is one task running `dvc repro --single-item <stage>` in the project, so `dvc.lock` and
the DVC cache stay the truth; a stage DVC finds up to date (or restores from its run cache) ends in
a `Cached` state instead of running. Stages run one at a time in topological order: two `dvc repro`
in one workspace contend for DVC's repo lock.

    python -m flows.compress --project . -S train.epochs=2     # local, ephemeral Prefect API
    prefect deploy --name nightly                               # scheduled, see prefect.yaml
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import typer
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import report
from flows.project import Dag, Outcome, apply_overrides, outcome, read_dag, run_dvc
from tasks.harness.config import FlowCfg, Params, load_params
from tasks.harness.errors import ConfigError, StageFailed

APPROVAL_STAGE = "promote"


class Approval(RunInput):
    """What a reviewer answers before `promote` runs (promote.require_approval: true)."""

    decision: Literal["approve", "reject"]
    reviewer: str
    comment: str = ""


def _retry_delays(cfg: FlowCfg) -> list[float]:
    # exponential backoff: retry_delay_s, 2x, 4x, ...
    return [cfg.retry_delay_s * 2**i for i in range(cfg.retries)]


@task(name="dvc-command", cache_policy=NO_CACHE)
def dvc_command(root: Path, args: list[str], env: dict[str, str], timeout_s: float) -> None:
    """`dvc <args>` in the project (pull, push); its output goes to the run's log."""
    logger = get_run_logger()
    result = run_dvc(root, *args, env=env, timeout_s=timeout_s, on_line=logger.info)
    if result.returncode != 0:
        raise StageFailed(
            f"dvc {' '.join(args)} failed (exit {result.returncode}):\n{result.tail()}"
        )


@task(name="stage", cache_policy=NO_CACHE)
def run_stage(root: Path, stage: str, env: dict[str, str], timeout_s: float) -> State | None:
    """Reproduce one stage through DVC; a stage DVC did not need to run ends `Cached`.

    Raises:
        StageFailed: the stage's command failed or timed out; the message ends with its own
            error output (what it printed to stderr, then DVC's summary).
    """
    logger = get_run_logger()
    result = run_dvc(
        root, "repro", "--single-item", stage, env=env, timeout_s=timeout_s, on_line=logger.info
    )
    if result.timed_out:
        raise StageFailed(f"stage {stage} timed out after {timeout_s:g} s:\n{result.tail()}")
    if result.returncode != 0:
        logger.error("stage %s failed:\n%s", stage, result.tail())
        raise StageFailed(f"stage {stage} failed (exit {result.returncode}):\n{result.tail()}")
    if outcome(stage, result.output) is Outcome.CACHED:
        return Completed(name="Cached", message=f"DVC: stage {stage} is up to date")
    return None


def _mlflow_uri(root: Path, given: str | None) -> str:
    # the stages resolve the default store relative to the project; the flow may run elsewhere
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{root / 'mlflow.db'}"


def _pipeline_run(uri: str, params: Params, execution_id: str) -> tuple[str, str]:
    """(experiment id, parent run id) of this execution in MLflow (tasks.harness.tracking's
    convention)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from tasks.harness.tracking import ensure_experiment, pipeline_run

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, params.project.mlflow_experiment)
    return experiment_id, pipeline_run(client, experiment_id, execution_id)


def _approval(root: Path, params: Params, uri: str, execution_id: str) -> Approval:
    """Pause for a reviewer, showing the KPI table; record the answer on the MLflow parent run."""
    logger = get_run_logger()
    rows = report.kpi_rows(root)
    table = report.kpi_markdown(rows) if rows else "_no KPI table: `compare` has not run_"
    create_markdown_artifact(table, key="kpis-for-review", description="KPIs before promote")
    logger.info("waiting for a reviewer before %s:\n%s", APPROVAL_STAGE, table)
    answer = pause_flow_run(
        wait_for_input=Approval.with_initial_data(
            description=f"Promote this candidate?\n\n{table}", decision="reject", reviewer=""
        ),
        timeout=int(params.flow.approval_timeout_s),
        poll_interval=2,
    )
    from mlflow.tracking import MlflowClient

    _, parent = _pipeline_run(uri, params, execution_id)
    client = MlflowClient(uri)
    for key in ("decision", "reviewer", "comment"):
        client.set_tag(parent, f"approval.{key}", getattr(answer, key))
    logger.info("reviewer %s: %s (%s)", answer.reviewer, answer.decision, answer.comment)
    return answer


def _downstream(dag: Dag, stage: str) -> set[str]:
    out, frontier = {stage}, [stage]
    while frontier:
        s = frontier.pop()
        for t, ups in dag.upstream.items():
            if s in ups and t not in out:
                out.add(t)
                frontier.append(t)
    return out


def _publish(root: Path, params: Params, uri: str, execution_id: str) -> None:
    """The KPI table and the links to the MLflow run and model version, as Prefect artifacts."""
    logger = get_run_logger()
    rows = report.kpi_rows(root)
    if rows:
        create_markdown_artifact(
            report.kpi_markdown(rows), key="kpis", description="KPIs of this run (test split)"
        )
    else:
        logger.warning("no artifacts/compare/engines.json: no KPI table to publish")
    experiment_id, run_id = _pipeline_run(uri, params, execution_id)
    url = report.mlflow_run_url(uri, experiment_id, run_id)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {run_id}", key="mlflow-run")
    else:
        create_markdown_artifact(
            f"MLflow parent run `{run_id}` (experiment {experiment_id}) in `{uri}`: "
            f"`mlflow ui --backend-store-uri {uri}`",
            key="mlflow-run",
        )
    version = report.model_version(root)
    if version:
        name, number = version
        vurl = report.model_version_url(uri, name, number)
        if vurl:
            create_link_artifact(vurl, link_text=f"{name} v{number}", key="model-version")
        else:
            create_markdown_artifact(
                f"model version `models:/{name}/{number}`", key="model-version"
            )


@flow(name="compress")
def compress(
    project: str = ".",
    overrides: list[str] | None = None,
    pull: bool = False,
    push: bool = False,
    mlflow_tracking_uri: str | None = None,
) -> dict[str, str]:
    """Reproduce the project's DVC pipeline stage by stage.

    Args:
        project: the DVC project (repository root).
        overrides: params.yaml overrides, `key=value` as with `dvc exp run -S` (written to
            params.yaml, as `dvc exp run` does in the workspace, once they validate).
        pull: `dvc pull --allow-missing` first (the nightly run starts from the remote's cache).
        push: `dvc push` at the end.
        mlflow_tracking_uri: where the stages log (else MLFLOW_TRACKING_URI, else the project's
            `mlflow.db`).

    Returns:
        Each stage's final state name (`Completed`, `Cached`, `Rejected`).

    Raises:
        ConfigError: params.yaml (after the overrides) is invalid; nothing ran.
        StageFailed: a stage failed after its retries; its error output is in the message.
    """
    logger = get_run_logger()
    root = Path(project).resolve()
    try:
        apply_overrides(root, overrides or [], check=load_params)
        params = load_params(root / "params.yaml")
    except ConfigError as e:
        logger.error("%s", e)
        raise
    cfg = params.flow
    dag = read_dag(root)
    logger.info("DAG of %s: %s", root, " -> ".join(dag.stages))
    execution_id = str(flow_run.id)
    uri = _mlflow_uri(root, mlflow_tracking_uri)
    env = {"SHRINKFLOW_EXECUTION_ID": execution_id, "MLFLOW_TRACKING_URI": uri}
    remote = dvc_command.with_options(retries=cfg.retries, retry_delay_seconds=_retry_delays(cfg))
    has_remote = _has_remote(root)
    if (pull or push) and not has_remote:
        logger.warning("no DVC remote configured (`dvc remote add -d ...`): no pull, no push")
    if pull and has_remote:
        remote(root, ["pull", "--allow-missing"], env, cfg.timeout_s)

    states: dict[str, str] = {}
    rejected: set[str] = set()
    for stage in dag.stages:
        if stage in rejected:
            states[stage] = "Rejected"
            continue
        if stage == APPROVAL_STAGE and _requires_approval(root) and _changed(root, stage):
            answer = _approval(root, params, uri, execution_id)
            if answer.decision != "approve":
                rejected = _downstream(dag, stage)
                states[stage] = "Rejected"
                continue
        step = run_stage.with_options(
            task_run_name=stage,
            retries=cfg.retries,
            retry_delay_seconds=_retry_delays(cfg),
        )
        timeout_s = cfg.stage_timeout_s.get(stage, cfg.timeout_s)
        state = step(root, stage, env, timeout_s, return_state=True)
        states[stage] = state.name
        if state.is_failed():
            state.result()  # raises the stage's StageFailed: the flow fails with its message
    _publish(root, params, uri, execution_id)
    if push and has_remote:
        remote(root, ["push"], env, cfg.timeout_s)
    ran = sum(s == "Completed" for s in states.values())
    logger.info("%d stages ran, %d cached", ran, sum(s == "Cached" for s in states.values()))
    return states


def _has_remote(root: Path) -> bool:
    result = run_dvc(root, "remote", "list", timeout_s=60)
    return result.returncode == 0 and bool(result.output.strip())


def _changed(root: Path, stage: str) -> bool:
    # upstream stages have run by now: DVC says whether this one would run (an up-to-date
    # `promote` has nothing new to approve)
    result = run_dvc(root, "status", "--json", stage, timeout_s=300)
    return result.returncode != 0 or result.output.strip().splitlines()[-1:] != ["{}"]


def _requires_approval(root: Path) -> bool:
    # read raw: the `promote` section belongs to the promote stage's config
    import yaml

    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    return bool((raw.get("promote") or {}).get("require_approval", False))


app = typer.Typer(add_completion=False)


@app.command()
def main(
    project: Path = typer.Option(Path("."), help="the DVC project"),
    set_param: list[str] = typer.Option(
        [], "--set-param", "-S", help="params.yaml override key=value (as dvc exp run -S)"
    ),
    pull: bool = typer.Option(False, help="dvc pull --allow-missing before"),
    push: bool = typer.Option(False, help="dvc push after"),
    mlflow_tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI"),
) -> None:
    """Run the pipeline flow here (the ephemeral Prefect API unless PREFECT_API_URL is set)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = compress(
        project=str(project),
        overrides=set_param,
        pull=pull,
        push=push,
        mlflow_tracking_uri=mlflow_tracking_uri,
        return_state=True,
    )
    raise typer.Exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    app()
