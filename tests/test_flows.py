"""The Prefect flows: the DAG they read, retries, bad params, the deployment on a real Prefect
server with a real process worker (the session's one nightly run of the tiny DAG, `dag` in
tests/deployment.py, whose outputs tests/test_pipeline.py checks), and the recipe sweep on that
project."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.fanout import share_baseline
from flows.project import read_dag
from flows.recipe import yaml_value
from tasks.harness.errors import ConfigError
from tasks.harness.project import dvc
from tasks.metrics.pareto import pareto_front
from tests.conftest import stop_group, tiny_params
from tests.deployment import (
    POOL,
    PREFECT,
    SWEEP_POOL,
    artifacts,
    cli,
    client,
    flow_runs_of,
    logs,
    run_deployment,
    states_by_task,
    task_runs,
    wait_for,
)


def run_flow_here(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -m flows.compress` as a user runs it, against the test server."""
    return subprocess.run(
        [sys.executable, "-m", "flows.compress", "--project", str(project), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- small hand-made projects: trivial stages, the real params.yaml --------------------------

FLAKY = """\
import pathlib, sys
marker = pathlib.Path("attempted")
if not marker.exists():  # fail on the first attempt only
    marker.write_text("1")
    print("error: transient failure on the first attempt", file=sys.stderr)
    sys.exit(3)
pathlib.Path(sys.argv[1]).write_text("b")
"""


def write_stage(cmd: str, deps=(), outs=(), params=()) -> dict:
    stage = {"cmd": cmd}
    for key, value in (("deps", deps), ("outs", outs), ("params", params)):
        if value:
            stage[key] = list(value)
    return stage


def small_project(root: Path, stages: dict, params: dict | None = None) -> Path:
    """A git + DVC project with the given dvc.yaml stages and the tiny profile's params.yaml."""
    root.mkdir(parents=True)
    params = params or tiny_params()
    params["flow"] = {**params.get("flow", {}), "retry_delay_s": 0.5}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "flaky.py").write_text(FLAKY)
    (root / ".gitignore").write_text("attempted\n")
    git = ["git", "-c", "user.email=ci@shrinkflow", "-c", "user.name=shrinkflow"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert dvc(root, "init", "-q").returncode == 0
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "small project"], cwd=root, check=True)
    return root


def py(code: str) -> str:
    return f'python -c "{code}"'


DIAMOND = {
    "a": write_stage(py("open('a.txt','w').write('a')"), outs=["a.txt"], params=["train.epochs"]),
    "b": write_stage("python flaky.py b.txt", deps=["a.txt", "flaky.py"], outs=["b.txt"]),
    "c": write_stage(py("open('c.txt','w').write('c')"), deps=["a.txt"], outs=["c.txt"]),
    "d": write_stage(py("open('d.txt','w').write('d')"), deps=["b.txt", "c.txt"], outs=["d.txt"]),
}


def dvc_dag_edges(root: Path) -> set[tuple[str, str]]:
    """The DAG as `dvc dag --dot` prints it: an independent reading of the project."""
    out = dvc(root, "dag", "--dot", "--full")
    assert out.returncode == 0, out.stderr
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', out.stdout)
    return {(a, b) for a, b in edges}


def test_the_flow_dag_is_the_dvc_dag_and_follows_dvc_yaml(tmp_path):
    proj = small_project(tmp_path / "p", dict(DIAMOND))
    dag = read_dag(proj)
    assert dag.edges() == dvc_dag_edges(proj)
    assert set(dag.stages) == {"a", "b", "c", "d"}
    for dep, stage in dag.edges():
        assert dag.stages.index(dep) < dag.stages.index(stage)
    # a stage added to dvc.yaml is in the flow, with no code change
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    stages["e"] = write_stage(py("open('e.txt','w').write('e')"), deps=["d.txt"], outs=["e.txt"])
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    dag = read_dag(proj)
    assert dag.stages[-1] == "e" and dag.upstream["e"] == ["d"]
    assert dag.edges() == dvc_dag_edges(proj)


def test_the_flow_dag_of_this_project_has_every_foreach_item():
    root = Path(__file__).resolve().parents[1]
    dag = read_dag(root)
    targets = yaml.safe_load((root / "params.yaml").read_text())["build_engine"]["targets"]
    for t in targets:
        assert f"build_engine@{t}" in dag.upstream[f"evaluate@{t}"]
        assert f"evaluate@{t}" in dag.upstream["compare"]
    assert dag.edges() == dvc_dag_edges(root)


@pytest.mark.server
def test_a_stage_that_fails_once_is_retried_then_cached_and_a_new_stage_runs(
    prefect_server, tmp_path
):
    api, env = prefect_server
    proj = small_project(tmp_path / "p", dict(DIAMOND))
    done = run_flow_here(proj, env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = flow_runs_of(api, proj)
    assert run.state.type.value == "COMPLETED"
    tasks = states_by_task(api, run.id)
    assert set(tasks) == {"a", "b", "c", "d"}
    assert all(t.state.name == "Completed" for t in tasks.values())
    assert tasks["b"].run_count == 2 and tasks["a"].run_count == 1  # b failed once, retried
    assert "transient failure on the first attempt" in logs(api, run.id)
    assert (proj / "d.txt").read_text() == "d"

    # nothing changed: every stage is reported cached, none runs
    again = run_flow_here(proj, env)
    assert again.returncode == 0, again.stderr[-3000:]
    latest = flow_runs_of(api, proj)[0]
    assert {t.state.name for t in states_by_task(api, latest.id).values()} == {"Cached"}

    # a stage added to dvc.yaml runs in the flow with no code change; the rest stays cached
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    stages["e"] = write_stage(py("open('e.txt','w').write('e')"), deps=["d.txt"], outs=["e.txt"])
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    third = run_flow_here(proj, env)
    assert third.returncode == 0, third.stderr[-3000:]
    tasks = states_by_task(api, flow_runs_of(api, proj)[0].id)
    assert {n: t.state.name for n, t in tasks.items()} == {
        "a": "Cached",
        "b": "Cached",
        "c": "Cached",
        "d": "Cached",
        "e": "Completed",
    }


@pytest.mark.server
def test_a_failing_stage_fails_the_flow_with_its_own_error(prefect_server, tmp_path):
    api, env = prefect_server
    stages = {
        "a": write_stage(py("open('a.txt','w').write('a')"), outs=["a.txt"]),
        "boom": write_stage(
            py("import sys; sys.exit('error: the boom stage cannot go on: disk on fire')"),
            deps=["a.txt"],
        ),
        "after": write_stage(py("open('z.txt','w').write('z')"), deps=["a.txt"], outs=["z.txt"]),
    }
    params = tiny_params()
    params["flow"] = {"retries": 0}
    proj = small_project(tmp_path / "p", stages, params)
    done = run_flow_here(proj, env)
    assert done.returncode != 0
    (run,) = flow_runs_of(api, proj)
    assert run.state.type.value == "FAILED"
    assert "disk on fire" in run.state.message
    assert "disk on fire" in logs(api, run.id)
    tasks = states_by_task(api, run.id)
    assert tasks["boom"].state.type.value == "FAILED" and tasks["a"].state.name == "Completed"
    assert "after" not in tasks  # nothing runs after a failed stage


@pytest.mark.server
def test_a_broken_params_yaml_fails_the_flow_with_the_validation_message(prefect_server, tmp_path):
    api, env = prefect_server
    proj = small_project(tmp_path / "p", dict(DIAMOND))
    before = (proj / "params.yaml").read_text()
    done = run_flow_here(proj, env, "-S", "train.epochs=0", "-S", "+train.epochz=3")
    assert done.returncode != 0
    (run,) = flow_runs_of(api, proj)
    assert run.state.type.value == "FAILED"
    for problem in (
        "params.yaml: train.epochs: Input should be greater than 0",
        "params.yaml: train.epochz: unknown key",
    ):
        assert problem in run.state.message and problem in logs(api, run.id)
    assert task_runs(api, run.id) == []  # validated before any stage ran
    assert not (proj / "a.txt").exists()
    assert (proj / "params.yaml").read_text() == before  # a bad override is not written


@pytest.mark.server
def test_a_stage_past_its_timeout_is_killed_and_fails_the_flow(prefect_server, tmp_path):
    api, env = prefect_server
    stages = {
        "slow": write_stage(
            py(
                "import os, time, pathlib; pathlib.Path('pid').write_text(str(os.getpid())); "
                "time.sleep(600)"
            )
        )
    }
    params = tiny_params()
    # long enough for `dvc` and the stage's python to start on a loaded 2-core machine
    params["flow"] = {"retries": 0, "stage_timeout_s": {"slow": 20}}
    proj = small_project(tmp_path / "p", stages, params)
    done = run_flow_here(proj, env)
    assert done.returncode != 0
    (run,) = flow_runs_of(api, proj)
    assert (
        run.state.type.value == "FAILED" and "stage slow timed out after 20 s" in run.state.message
    )
    pid = int((proj / "pid").read_text())
    for _ in range(50):  # the stage's process was killed, not left behind (allow it to exit)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the stage's process {pid} outlived the flow's timeout")


# --- the deployment: a real process worker runs the nightly flow on the tiny profile ---------


@pytest.mark.slow
@pytest.mark.server
def test_the_nightly_deployment_runs_every_stage_and_publishes_kpis(dag, prefect_server):
    api, _ = prefect_server
    proj, run, remote, mlflow_server = dag.proj, dag.run, dag.remote, dag.mlflow
    with client(api) as c:
        deployment = c.read_deployment_by_name("compress/nightly")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.active
    assert deployment.work_pool_name == POOL and run.deployment_id == deployment.id

    # every stage ran in order (tests/test_pipeline.py), and so did `dvc pull` and `dvc push`
    tasks = states_by_task(api, run.id)
    assert all(t.state.type.value == "COMPLETED" for t in tasks.values())
    assert sum(n.startswith("dvc-command") for n in tasks) == 2

    found = artifacts(api, run.id)
    kpis = found["kpis"].data
    table = json.loads((proj / "artifacts/compare/engines.json").read_text())
    for target in ("onnxruntime", "openvino"):
        assert f"{table[target]['map50']:.4g}" in kpis and target in kpis
    assert f"({mlflow_server}/#/experiments/" in found["mlflow-run"].data  # a Markdown link

    # the links name the MLflow parent run of this flow run and promote's registered version
    mlflow = MlflowClient(mlflow_server)
    exp = mlflow.get_experiment_by_name(tiny_params()["project"]["mlflow_experiment"])
    (parent,) = mlflow.search_runs(
        [exp.experiment_id],
        f"tags.`shrinkflow.execution_id` = '{run.id}' and tags.`shrinkflow.role` = 'pipeline'",
    )
    assert parent.info.run_id in found["mlflow-run"].data
    decision = json.loads((proj / "artifacts/promote/decision.json").read_text())
    assert f"/versions/{decision['version']}" in found["model-version"].data
    # `dvc push` ran at the end: the remote holds the trained model
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"].endswith("model.pt"))
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).exists()


# --- the human review before `promote` -------------------------------------------------------

PROMOTE = py(
    "import json, os; os.makedirs('artifacts/promote', exist_ok=True); "
    "json.dump({'registered_model': 'shrinkflow-detector', 'version': 7}, "
    "open('artifacts/promote/decision.json', 'w'))"
)


def wait_until_paused(api: str, project: Path, proc: subprocess.Popen, timeout_s: float = 120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = flow_runs_of(api, project)
        if runs and runs[0].state is not None and runs[0].state.is_paused():
            return runs[0]
        if proc.poll() is not None:
            raise AssertionError(f"the flow ended without pausing:\n{proc.stdout.read()[-3000:]}")
        time.sleep(1)
    raise TimeoutError("the flow did not pause for approval")


@pytest.mark.server
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_promote_waits_for_a_reviewer_and_the_decision_is_recorded_in_mlflow(
    prefect_server, mlflow_server, tmp_path, decision
):
    from tasks.harness.config import Params

    if "promote" not in Params.model_fields:
        pytest.skip("params.yaml has no `promote` section yet (the promote stage's issue)")
    api, env = prefect_server
    params = tiny_params()
    params["promote"] = {**params.get("promote", {}), "require_approval": True}
    params["flow"] = {"approval_timeout_s": 90}  # a wrong pause fails the test, not hangs it
    stages = {
        "a": write_stage(py("open('a.txt','w').write('a')"), outs=["a.txt"]),
        "promote": write_stage(PROMOTE, deps=["a.txt"]),
    }
    proj = small_project(tmp_path / "p", stages, params)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.compress", "--project", str(proj)],
        env={**env, "MLFLOW_TRACKING_URI": mlflow_server},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        paused = wait_until_paused(api, proj, proc)
        assert states_by_task(api, paused.id)["a"].state.name == "Completed"
        assert not (proj / "artifacts/promote/decision.json").exists()  # promote waits
        assert "kpis-for-review" in artifacts(api, paused.id)
        answer = {"decision": decision, "reviewer": "ada", "comment": "looks right"}
        with client(api) as c:
            c.resume_flow_run(paused.id, run_input=answer)
        proc.wait(timeout=120)
    finally:
        stop_group(proc)
    run = wait_for(api, paused.id, 60)
    assert run.state.type.value == "COMPLETED"
    promoted = (proj / "artifacts/promote/decision.json").exists()
    assert promoted == (decision == "approve")
    found = artifacts(api, run.id)
    assert ("model-version" in found) == promoted
    if promoted:
        assert "shrinkflow-detector/versions/7" in found["model-version"].data
    mlflow = MlflowClient(mlflow_server)
    exp = mlflow.get_experiment_by_name(params["project"]["mlflow_experiment"])
    (parent,) = mlflow.search_runs(
        [exp.experiment_id], f"tags.`shrinkflow.execution_id` = '{run.id}'"
    )
    assert parent.data.tags["approval.decision"] == decision
    assert parent.data.tags["approval.reviewer"] == "ada"
    assert parent.data.tags["approval.comment"] == "looks right"
    if promoted:  # nothing changed since: promote is up to date, there is nothing to review
        again = run_flow_here(proj, {**env, "MLFLOW_TRACKING_URI": mlflow_server})
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        latest = flow_runs_of(api, proj)[0]
        assert states_by_task(api, latest.id)["promote"].state.name == "Cached"


# --- the recipe sweep, on the project the nightly run reproduced -----------------------------


def commit_baseline(proj: Path) -> None:
    """Commit the reproduced baseline (if not yet): experiments re-run only what their params
    touch."""
    git = ["git", "-c", "user.email=ci@shrinkflow", "-c", "user.name=shrinkflow"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=proj).returncode:
        subprocess.run([*git, "commit", "-qm", "baseline"], cwd=proj, check=True)


def sweep_runs(mlflow: MlflowClient, experiment_id: str, flow_run_id) -> list:
    """The MLflow `sweep` run(s) of one sweep flow run (named `sweep-<first 8 of its id>`)."""
    name = f"sweep-{str(flow_run_id)[:8]}"
    return mlflow.search_runs(
        [experiment_id], f"tags.`shrinkflow.role` = 'sweep' and attributes.run_name = '{name}'"
    )


# Two recipes (CI time); the fanned-out sweep below runs the same grid on two workers.
SWEEP_GRID = {
    "quantize.calibrator": ["minmax"],
    "quantize.precision": ["int8", "fp16"],
}
# One-value axes, the same in every recipe (CI time): the sweep compares recipes on its target
# (onnxruntime), so each recipe builds only that engine and leaves out NNCF's rows and the
# calibrator comparison (quantize's, and variants' int8_<calibrator> rows: ORT's entropy search
# alone took ~20 s a recipe); the DAG's other engines, the peers and the calibrator rows are
# tests/test_pipeline.py's.
CONSTANT = {
    "build_engine.targets": [["onnxruntime"]],
    "variants.peers": [False],
    "quantize.compare_calibrators": [False],
}


def grid_args(grid: dict) -> list[str]:
    """`-g key=v1,v2` arguments of `python -m flows.sweep` for `grid`."""
    return [a for k, v in grid.items() for a in ("-g", f"{k}={','.join(map(yaml_value, v))}")]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.extended  # ~4 min: the fanned-out sweep below runs the same grid in CI
def test_a_sweep_yields_an_experiment_per_recipe_and_a_pareto_front(
    dag, prefect_server, mlflow_server, tmp_path
):
    from tasks.metrics.pareto import dominates

    api, _ = prefect_server
    proj = dag.proj
    commit_baseline(proj)
    t0 = time.perf_counter()
    run = run_deployment(  # in sequence, in the deployment's checkout
        api,
        "sweep/sweep",
        {
            "grid": SWEEP_GRID | CONSTANT,
            "mlflow_tracking_uri": mlflow_server,
            "recipe_deployment": None,
        },
    )
    print(f"sweep through the deployment: {time.perf_counter() - t0:.1f} s")
    assert run.state.type.value == "COMPLETED", f"{run.state}\n{logs(api, run.id)[-5000:]}"

    shown = json.loads(dvc(proj, "exp", "show", "--json").stdout)
    names = [e["name"] for b in shown for e in b.get("experiments") or []]
    ours = [n for n in names if n.startswith(f"sweep-{str(run.id)[:8]}-")]
    assert len(ours) == len(SWEEP_GRID["quantize.calibrator"]) * len(
        SWEEP_GRID["quantize.precision"]
    )

    mlflow = MlflowClient(mlflow_server)
    exp = mlflow.get_experiment_by_name(tiny_params()["project"]["mlflow_experiment"])
    (sweep_run,) = sweep_runs(mlflow, exp.experiment_id, run.id)
    files = {f.path for f in mlflow.list_artifacts(sweep_run.info.run_id, "sweep")}
    assert files == {"sweep/pareto.md", "sweep/pareto.png", "sweep/sweep.json"}
    result = json.loads(
        Path(
            mlflow.download_artifacts(sweep_run.info.run_id, "sweep/sweep.json", str(tmp_path))
        ).read_text()
    )
    rows = result["rows"]
    assert sorted(r["experiment"] for r in rows) == sorted(ours)
    recipes_run = {(r["quantize.calibrator"], r["quantize.precision"]) for r in rows}
    assert recipes_run == {
        (c, p) for c in SWEEP_GRID["quantize.calibrator"] for p in SWEEP_GRID["quantize.precision"]
    }
    assert all(r["status"] == "ok" and 0 < r["map50"] <= 1 for r in rows)
    x, y = "latency_ms_p50", "map50"
    for r in rows:
        dominated = any(dominates(q, r, x, y) for q in rows)
        assert r["pareto"] == (not dominated), r
    if result["best"] is not None:
        assert result["best"]["delta_map50"] >= -0.01 - 1e-12
        assert sweep_run.data.tags["best_recipe"] == result["best"]["experiment"]
    report = artifacts(api, run.id)["pareto-front"].data
    assert all(name in report for name in ours) and "recipe" in report.lower()


# --- the same sweep fanned out: one flow run per recipe, two workers on one pool -----------

METRICS = "artifacts/evaluate/onnxruntime/metrics.json"


def test_a_fanned_out_sweep_refuses_an_uncommitted_baseline(tmp_path):
    """Workers clone the commit: a params.yaml change they would not see is an error."""
    proj = small_project(tmp_path / "p", {"a": write_stage("echo a")})
    with (proj / "params.yaml").open("a") as f:
        f.write("# edited, not committed\n")
    with pytest.raises(ConfigError, match=r"commit the baseline before a fanned-out sweep"):
        share_baseline.fn(proj, 60)


@pytest.fixture(scope="module")
def sweep_workers(dag, prefect_server, tmp_path_factory):
    """Two `prefect worker start --limit 1` on the sweep pool, whose concurrency limit is 2 (the
    number of workers), for the project the nightly run reproduced (committed, its outputs in
    the local DVC remote); yields their log files."""
    _, env = prefect_server
    proj = dag.proj
    commit_baseline(proj)
    assert dvc(proj, "push").returncode == 0
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
    dag, sweep_workers, prefect_server, mlflow_server, tmp_path
):
    api, env = prefect_server
    proj = dag.proj
    grid = grid_args(SWEEP_GRID | CONSTANT)
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
    run = flow_runs_of(api, proj)[0]  # the newest run naming this project: this sweep's
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
    recipe = ("quantize.calibrator", "quantize.precision")
    by_recipe = {tuple(r[k] for k in recipe): r for r in rows.values()}
    assert sorted(by_recipe) == sorted(itertools.product(*SWEEP_GRID.values()))
    assert all(r["status"] == "ok" for r in rows.values()), rows

    # each recipe was its own flow run of the recipe deployment on the sweep pool ...
    with client(api) as c:
        recipe_deployment = c.read_deployment_by_name("sweep-recipe/recipe")
        recipe_runs = {n: c.read_flow_run(r["flow_run"]) for n, r in rows.items()}
    for fr in recipe_runs.values():
        assert fr.deployment_id == recipe_deployment.id and fr.work_pool_name == SWEEP_POOL
        assert fr.state.type.value == "COMPLETED"
    # ... each worker ran one of them (both may try the same run first: Prefect's server aborts
    # the second submission, "Aborted submission of flow run ...", so count the runs a worker
    # handed to its infrastructure), and the two ran at the same time
    for log in worker_logs:
        ran = [r for r in recipe_runs.values() if f"'{r.name}' submitted to infrastructure" in log]
        assert len(ran) == 1, log[-3000:]
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
    pushed = {  # each experiment's metrics files
        e["name"]: e["revs"][0]["data"]["metrics"]
        for b in shown
        for e in b.get("experiments") or []
        if e.get("name") in rows
    }
    assert sorted(pushed) == sorted(rows)
    for name, files in pushed.items():
        m = files[METRICS]["data"]
        assert m["map50"] == pytest.approx(rows[name]["map50"])
        assert m["latency_ms_p50"] == pytest.approx(rows[name]["latency_ms_p50"])
        # quantize.compare_calibrators off: variants has no int8_<calibrator> rows either
        variants = files["artifacts/variants/metrics.json"]["data"]
        assert "deployed" in variants and not any(k.startswith("int8_") for k in variants), name

    # the front is the one tasks/pareto (the sequential sweep's) computes from those KPIs
    expected = {r["experiment"] for r in pareto_front(list(rows.values()))}
    assert {n for n, r in rows.items() if r["pareto"]} == expected
    report = artifacts(api, run.id)["pareto-front"].data
    assert all(name in report for name in rows)
