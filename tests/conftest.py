"""Shared fixtures: the tiny profile, a tiny dataset, a project copy in a temp dir, a real
MLflow server on 127.0.0.1 (free port, always stopped), and (tests/deployment.py) a real Prefect
server and worker with one nightly run of the tiny DAG."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.harness.config import DataCfg, Params
from tasks.harness.project import profile_params

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tiny_params() -> dict:
    return profile_params("tiny")


@pytest.fixture(scope="session")
def tiny() -> Params:
    return Params.model_validate(tiny_params())


@pytest.fixture(scope="session")
def adapter(tiny):
    """The tiny profile's model adapter (the built-in detector at width 0.5)."""
    from tasks.models import adapter_for

    return adapter_for(tiny.model)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny) -> Path:
    """The default data composed with the tiny profile (train 320, val 32, test 32, 64 px)."""
    from tasks.datasets import digits as data

    out = tmp_path_factory.mktemp("dataset") / "default"
    data.run(tiny.data, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_manifest(tiny_dataset, tiny) -> dict:
    from tasks import label_qa

    _, manifest, _ = label_qa.run(tiny.label_qa, dataset=tiny_dataset)
    return manifest


@pytest.fixture(scope="session")
def models(tiny, adapter, tiny_manifest, tmp_path_factory) -> Path:
    """A folder with a briefly trained checkpoint (model.pt), its FP32 ONNX (fp32.onnx) and an
    INT8 QDQ ONNX (int8.onnx, minmax): the engine and NNCF-peer tests share it."""
    from tasks import export, quantize, train
    from tasks.datasets.coco import DetectionSet

    tmp = tmp_path_factory.mktemp("engines")
    tr, va = (DetectionSet(tiny_manifest, s, 64) for s in ("train", "val"))
    model, _ = train.run(adapter, tiny.train.model_copy(update={"epochs": 8}), train=tr, val=va)
    adapter.save(tmp / "model.pt", model, tiny_manifest["splits"]["train"]["categories"], {})
    export.run(
        tiny.export, checkpoint=tmp / "model.pt", manifest=tiny_manifest, out=tmp / "fp32.onnx"
    )
    cfg = tiny.quantize
    images, _, _ = quantize.calibration_set(cfg, tr)
    quantize.calibrate(tmp / "fp32.onnx", images, cfg, "minmax", tmp / "ranges.json")
    quantize.to_int8(tmp / "fp32.onnx", tmp / "int8.onnx", tmp / "ranges.json", cfg, "minmax")
    return tmp


def small_data_cfg(**overrides) -> DataCfg:
    base = {
        "train_images": 12,
        "val_images": 4,
        "test_images": 4,
        "canvas_size": 64,
        "digit_size": (12, 24),
        "digits_per_image": (1, 3),
        "clutter": 1,
    }
    return DataCfg(**{**base, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with `start_new_session=True` and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@contextlib.contextmanager
def running_server(cmd: list[str], *, cwd: Path, health_url: str, env: dict | None = None):
    """Start a server (its output in `cwd/server.log`), wait until `health_url` answers 200,
    yield the process, and always stop its whole process group."""
    log = open(cwd / "server.log", "a")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"{Path(cmd[0]).name} did not start: {(cwd / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc)
        log.close()


@contextlib.contextmanager
def running_mlflow_server(work: Path, port: int | None = None):
    """A real `mlflow server` on 127.0.0.1 with its SQLite store and artifacts under `work`;
    yields its URI and always stops it. The same `work` and `port` restart the same server."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(exe),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{work / 'mlflow.db'}",
        "--artifacts-destination",
        str(work / "artifacts"),
    ]
    uri = f"http://127.0.0.1:{port}"
    with running_server(cmd, cwd=work, health_url=f"{uri}/health"):
        yield uri


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; yields its URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


# The Prefect server, its worker and the one nightly run of the tiny DAG: session fixtures that
# tests/test_pipeline.py and tests/test_flows.py share (imported last: they use the helpers above).
from tests.deployment import dag, dag_mlflow, prefect_server, worker  # noqa: E402, F401
