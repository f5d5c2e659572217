"""The Prefect side of the tests: a real Prefect server and process worker (session-scoped), the
client helpers that read flow runs, task runs, logs and artifacts back, and `dag`: the tiny DAG on
a user's YOLO-format data, deployed from its prefect.yaml and run once by the nightly deployment.

tests/test_pipeline.py asserts what that one run made (every stage, output, KPI, MLflow run and
model version), tests/test_flows.py the deployment itself and the recipe sweeps on the same
project; both import these names through tests/conftest.py, so the DAG runs once per session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks.datasets import digits as data
from tasks.harness.config import DataCfg
from tasks.harness.project import copy_project, dvc, venv_env
from tasks.models.ultralytics_io import SPLITS, write_yolo_dataset
from tests.conftest import free_port, running_mlflow_server, running_server, stop_group, tiny_params

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "shrinkflow"  # the work pool prefect.yaml names
SWEEP_POOL = "shrinkflow-sweep"  # the pool of prefect.yaml's `recipe` deployment
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
YOLO = "data/yolo"  # the user's dataset folder inside the project (`dataset.path`)
TARGETS = ["onnxruntime", "openvino", "tensorrt", "litert"]
STAGES = [
    "check_params",  # re-runs on any params.yaml edit
    "ingest",
    "label_qa",
    "train",
    "reference",  # the trained FP32 model as ONNX, once for every evaluate@<target>
    "prune",
    "distill",
    "export",
    "quantize",
    *[f"build_engine@{t}" for t in TARGETS],
    *[f"evaluate@{t}" for t in TARGETS],
    "variants",
    "compare",
    "promote",
]


def prefect_env(home: Path, api_url: str | None = None) -> dict:
    env = venv_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="2",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def client(api: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def wait_for(api: str, flow_run_id, timeout_s: float = 900):
    with client(api) as c:
        deadline = time.time() + timeout_s
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state is not None and run.state.type.value in TERMINAL:
                return run
            if time.time() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state} after {timeout_s} s")
            time.sleep(2)


def task_runs(api: str, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(api) as c:
        return c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def states_by_task(api: str, flow_run_id) -> dict[str, object]:
    return {t.name: t for t in task_runs(api, flow_run_id)}


def artifacts(api: str, flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client(api) as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def logs(api: str, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(api) as c:
        found = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(entry.message for entry in found)


def flow_runs_of(api: str, project: Path) -> list:
    """The flow runs (newest first) whose `project` parameter is `project`."""
    from prefect.client.schemas.sorting import FlowRunSort

    with client(api) as c:
        found = c.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
    return [r for r in found if r.parameters.get("project") == str(project)]


def cli(env: dict, cwd: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-3000:]}{out.stderr}"
    return out


def run_deployment(api: str, name: str, parameters: dict, timeout_s: float = 900):
    with client(api) as c:
        deployment = c.read_deployment_by_name(name)
        run = c.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return wait_for(api, run.id, timeout_s)


def pipeline_params() -> dict:
    """The tiny profile (every target, NNCF's peer rows on), reading its data from the
    YOLO-format folder `YOLO`."""
    params = tiny_params()
    params["dataset"] = {**params["dataset"], "format": "yolo", "path": YOLO}
    return params


def write_yolo_copy(data_cfg: DataCfg, work: Path, dst: Path) -> None:
    """Compose the digits of `data_cfg` as COCO under `work`, then write them in the Ultralytics
    layout under `dst` (copies: the project reads the folder as a user's dataset)."""
    data.run(data_cfg, out_dir=work)
    splits = {s: json.loads((work / f"{s}.json").read_text()) for s in SPLITS}
    spec_file = write_yolo_dataset({"root": str(work), "splits": splits}, dst, link=False)
    # `path: .` (the folder itself), as a dataset committed with its project names it: the
    # project is copied (tests/test_pipeline.py) and cloned (the sweep's workers)
    spec = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**spec, "path": "."}, sort_keys=False))


def copy_of(proj: Path, dest: Path) -> Path:
    """A copy of a reproduced project (git history, dvc.lock, DVC cache, outputs) for a test that
    changes it. DVC's state (`.dvc/tmp`: hashes by inode) is left out: the copy is hashed anew."""
    state = proj / ".dvc" / "tmp"

    def skip(folder: str, names: list[str]) -> set[str]:
        return {"tmp"} if Path(folder) == state.parent else set()

    shutil.copytree(proj, dest, symlinks=True, ignore=skip)
    return dest


@dataclass(frozen=True)
class Dag:
    """The tiny project and its one nightly flow run."""

    proj: Path
    run: object  # the flow run (prefect.client.schemas.objects.FlowRun)
    remote: Path  # the DVC remote the flow pushed to
    mlflow: str  # its own MLflow server: nothing else logs there


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (free port, temp PREFECT_HOME); yields the
    API URL and the environment that points a Prefect client or CLI at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    cmd = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running_server(cmd, cwd=home, health_url=f"{api}/health", env=prefect_env(home)):
        yield api, prefect_env(home, api)


@pytest.fixture(scope="session")
def worker(prefect_server, tmp_path_factory):
    """A process work pool (the one prefect.yaml names) and a `prefect worker start` on it;
    yields its log file."""
    api, env = prefect_server
    work = tmp_path_factory.mktemp("worker")
    cli(env, work, "work-pool", "create", POOL, "--type", "process")
    log = open(work / "worker.log", "w")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield work / "worker.log"
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="session")
def dag_mlflow(tmp_path_factory):
    """The tiny DAG's own MLflow server: its tests count the runs and model versions of one
    execution, so no other test logs there (the sweeps use the session's `mlflow_server`)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-dag")) as uri:
        yield uri


@pytest.fixture(scope="session")
def dag(prefect_server, worker, dag_mlflow, tmp_path_factory) -> Dag:
    """The tiny project on YOLO-format data, every target, NNCF's peer rows on, a local DVC
    remote; deployed from its prefect.yaml (`prefect deploy --all`) and run once by the nightly
    deployment on the process worker, logging to `dag_mlflow`."""
    api, env = prefect_server
    tmp = tmp_path_factory.mktemp("dag")
    params = pipeline_params()
    proj = copy_project(tmp / "proj", params)
    write_yolo_copy(DataCfg(**params["data"]), tmp / "coco", proj / YOLO)
    assert dvc(proj, "remote", "add", "-d", "local", str(tmp / "remote")).returncode == 0
    # committed: the sweep's workers clone the commit and read the data from it
    git = ["git", "-c", "user.email=ci@shrinkflow", "-c", "user.name=shrinkflow"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-qm", "YOLO data, DVC remote"], cwd=proj, check=True)
    cli(env, proj, "work-pool", "create", SWEEP_POOL, "--type", "process")
    cli(env, proj, "--no-prompt", "deploy", "--all")
    t0 = time.perf_counter()
    run = run_deployment(api, "compress/nightly", {"mlflow_tracking_uri": dag_mlflow}, 2400)
    print(f"tiny DAG through the nightly deployment: {time.perf_counter() - t0:.1f} s")
    assert run.state.type.value == "COMPLETED", (
        f"{run.state}\n{logs(api, run.id)[-5000:]}\n{worker.read_text()[-3000:]}"
    )
    return Dag(proj, run, tmp / "remote", dag_mlflow)
