"""The recipe sweep fanned out: one flow run per recipe of the `sweep-recipe/recipe` deployment,
taken by two process workers on one pool (a real Prefect server), against a local folder as the
shared DVC remote and a real MLflow server."""

# ruff: noqa: F811  (the imported fixtures are requested by name)

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.sweep import share_baseline
from tasks.errors import ConfigError
from tasks.pareto import pareto_front
from tasks.project import copy_project, dvc
from tests.conftest import stop_group, tiny_params
from tests.test_flows import (
    POOL,
    PREFECT,
    SWEEP_POOL,
    artifacts,
    cli,
    client,
    commit_baseline,
    flow_runs_of,
    logs,
    prefect_server,  # noqa: F401  (fixture: a real `prefect server start`)
    small_project,
    sweep_runs,
    write_stage,
)

GRID = {"quantize.calibrator": ["minmax", "percentile"]}
METRICS = "artifacts/evaluate/onnxruntime/metrics.json"


def fast_params() -> dict:
    """The tiny profile, shorter still: the sweep's plumbing is under test, not the model."""
    params = tiny_params()
    params["train"]["epochs"] = 6
    params["distill"]["epochs"] = 1
    params["build_engine"]["targets"] = ["onnxruntime"]
    return params


def test_a_fanned_out_sweep_refuses_an_uncommitted_baseline(tmp_path):
    """Workers clone the commit: a params.yaml change they would not see is an error."""
    proj = small_project(tmp_path / "p", {"a": write_stage("echo a")})
    with (proj / "params.yaml").open("a") as f:
        f.write("# edited, not committed\n")
    with pytest.raises(ConfigError, match=r"commit the baseline before a fanned-out sweep"):
        share_baseline.fn(proj, 60)


@pytest.fixture(scope="module")
def baseline(prefect_server, mlflow_server, tmp_path_factory):
    """A reproduced, committed project whose outputs are in a local DVC remote, with prefect.yaml's
    deployments on the server."""
    _, env = prefect_server
    tmp = tmp_path_factory.mktemp("sweep")
    proj = copy_project(tmp / "proj", fast_params())
    assert dvc(proj, "remote", "add", "-d", "local", str(tmp / "remote")).returncode == 0
    done = dvc(proj, "repro", env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert dvc(proj, "push").returncode == 0
    commit_baseline(proj)
    for pool in (POOL, SWEEP_POOL):
        cli(env, proj, "work-pool", "create", pool, "--type", "process")
    cli(env, proj, "--no-prompt", "deploy", "--all")
    return proj


@pytest.fixture(scope="module")
def sweep_workers(baseline, prefect_server, tmp_path_factory):
    """Two `prefect worker start --limit 1` on the sweep pool, whose concurrency limit is 2 (the
    number of workers); yields their log files."""
    _, env = prefect_server
    work = tmp_path_factory.mktemp("sweep-workers")
    cli(env, work, "work-pool", "set-concurrency-limit", SWEEP_POOL, "2")
    procs, files = [], []
    try:
        for i in (1, 2):
            path = work / f"worker{i}.log"
            files.append((path, open(path, "w")))  # noqa: SIM115  (closed in the finally)
            cmd = [PREFECT, "worker", "start", "--pool", SWEEP_POOL, "--type", "process"]
            procs.append(
                subprocess.Popen(
                    [*cmd, "--name", f"sweep-worker-{i}", "--limit", "1"],
                    cwd=work,
                    env=env,
                    stdout=files[-1][1],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield [path for path, _ in files]
    finally:
        for proc in procs:
            stop_group(proc)
        for _, f in files:
            f.close()


@pytest.mark.slow
@pytest.mark.server
def test_a_fanned_out_sweep_runs_each_recipe_on_its_own_worker_and_finds_the_same_front(
    baseline, sweep_workers, prefect_server, mlflow_server, tmp_path
):
    api, env = prefect_server
    proj = baseline
    grid = [a for k, v in GRID.items() for a in ("-g", f"{k}={','.join(v)}")]
    t0 = time.perf_counter()
    done = subprocess.run(  # as a user starts it, against the server
        [sys.executable, "-m", "flows.sweep", "--project", str(proj), *grid]
        + ["--deployment", "sweep-recipe/recipe", "--mlflow-tracking-uri", mlflow_server],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    print(f"fanned-out sweep of 2 recipes on 2 workers: {time.perf_counter() - t0:.1f} s")
    worker_logs = [p.read_text() for p in sweep_workers]
    (run,) = flow_runs_of(api, proj)
    assert done.returncode == 0 and run.state.type.value == "COMPLETED", (
        f"{done.stdout[-3000:]}{done.stderr[-3000:]}\n{logs(api, run.id)[-5000:]}\n"
        + "\n".join(w[-3000:] for w in worker_logs)
    )

    mlflow = MlflowClient(mlflow_server)
    exp = mlflow.get_experiment_by_name(tiny_params()["project"]["mlflow_experiment"])
    (sweep_run,) = sweep_runs(mlflow, exp.experiment_id, run.id)
    result = json.loads(
        Path(
            mlflow.download_artifacts(sweep_run.info.run_id, "sweep/sweep.json", str(tmp_path))
        ).read_text()
    )
    rows = {r["experiment"]: r for r in result["rows"]}
    assert sorted(r["quantize.calibrator"] for r in rows.values()) == GRID["quantize.calibrator"]
    assert all(r["status"] == "ok" for r in rows.values()), rows

    # each recipe was its own flow run of the recipe deployment on the sweep pool ...
    with client(api) as c:
        recipe_deployment = c.read_deployment_by_name("sweep-recipe/recipe")
        recipe_runs = {n: c.read_flow_run(r["flow_run"]) for n, r in rows.items()}
    for fr in recipe_runs.values():
        assert fr.deployment_id == recipe_deployment.id and fr.work_pool_name == SWEEP_POOL
        assert fr.state.type.value == "COMPLETED"
    # ... each worker took one of them, and the two ran at the same time
    for log in worker_logs:
        assert sum(str(fr.id) in log for fr in recipe_runs.values()) == 1, log[-3000:]
    first, second = sorted(recipe_runs.values(), key=lambda fr: fr.start_time)
    assert second.start_time < first.end_time

    # every recipe's KPIs arrived in MLflow from its worker, and the sweep's rows are them
    kpi_runs = mlflow.search_runs(
        [exp.experiment_id],
        f"tags.`shrinkflow.sweep` = 'sweep-{str(run.id)[:8]}' "
        "and tags.`shrinkflow.role` = 'sweep-recipe'",
    )
    assert sorted(r.info.run_name for r in kpi_runs) == sorted(rows)
    for r in kpi_runs:
        row = rows[r.info.run_name]
        assert r.data.params["quantize.calibrator"] == row["quantize.calibrator"]
        assert r.data.tags["prefect.flow_run_id"] == row["flow_run"]
        for k in ("map50", "latency_ms_p50", "size_mb"):
            assert r.data.metrics[k] == pytest.approx(row[k])
        assert 0 < row["map50"] <= 1 and row["latency_ms_p50"] > 0

    # the experiments were pushed back to the project (git ref + DVC remote), with those KPIs
    shown = json.loads(dvc(proj, "exp", "show", "--json").stdout)
    pushed = {
        e["name"]: e["revs"][0]["data"]["metrics"][METRICS]["data"]
        for b in shown
        for e in b.get("experiments") or []
        if e.get("name") in rows
    }
    assert sorted(pushed) == sorted(rows)
    for name, m in pushed.items():
        assert m["map50"] == pytest.approx(rows[name]["map50"])
        assert m["latency_ms_p50"] == pytest.approx(rows[name]["latency_ms_p50"])

    # the front is the one tasks/pareto (the sequential sweep's) computes from those KPIs
    expected = {r["experiment"] for r in pareto_front(list(rows.values()))}
    assert {n for n, r in rows.items() if r["pareto"]} == expected
    report = artifacts(api, run.id)["pareto-front"].data
    assert all(name in report for name in rows)
