"""A user's own model family through `model.factory` (tests/fixtures/my_detector.py, a grid
detector unlike the built-in one): train -> export -> build_engine -> evaluate with the real
stage functions, and the one-line errors of a factory that is not usable."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks import build_engine, evaluate, export, train
from tasks.coco import DetectionSet
from tasks.models import load_checkpoint
from tasks.training import evaluate_model
from tests.conftest import tiny_params

FACTORY = "tests.fixtures.my_detector:build"


def test_user_family_trains_exports_and_evaluates(tiny, tiny_manifest, tmp_path):
    from tasks.models import adapter_for

    model_cfg = tiny.model.model_copy(update={"factory": FACTORY})
    adapter = adapter_for(model_cfg)
    cfg = tiny.train.model_copy(update={"epochs": 10, "threads": 1})
    train_set = DetectionSet(tiny_manifest, "train", cfg.input_size)
    val = DetectionSet(tiny_manifest, "val", cfg.input_size)
    untrained = evaluate_model(adapter, adapter.build(len(train_set.categories), 64, 0), val)
    model, history = train.run(adapter, cfg, train=train_set, val=val)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    ckpt_path = tmp_path / "model.pt"
    adapter.save(ckpt_path, model, train_set.categories, {"train_cfg": cfg.model_dump()})

    loaded_adapter, _, ckpt = load_checkpoint(ckpt_path, model_cfg)  # weights_only inside
    assert ckpt["family"] == loaded_adapter.family == "my_detector"

    export_cfg = tiny.export
    onnx_path = tmp_path / "model.onnx"
    facts = export.run(
        export_cfg, checkpoint=ckpt_path, manifest=tiny_manifest, out=onnx_path,
        model_cfg=model_cfg,
    )  # fmt: skip
    assert facts["parity_max_abs_diff"] <= export_cfg.parity_tolerance

    engine_cfg = tiny.build_engine.model_copy(update={"threads": 1})
    built = build_engine.run(
        engine_cfg, target="onnxruntime", onnx_path=onnx_path, out=tmp_path / "engine"
    )
    assert built["status"] == "ok"
    (tmp_path / "work").mkdir()
    metrics, _ = evaluate.run(
        tiny.evaluate,
        target="onnxruntime",
        engine_dir=tmp_path / "engine",
        model_checkpoint=ckpt_path,
        baseline_checkpoint=ckpt_path,
        work=tmp_path / "work",
        manifest=tiny_manifest,
        engine_cfg=engine_cfg,
        export_cfg=export_cfg,
        model_cfg=model_cfg,
    )
    assert metrics["status"] == "ok" and metrics["macs"] > 0
    assert all(math.isfinite(metrics[k]) for k in ("map50", "map50_95", "precision", "recall"))
    assert metrics["map50"] > untrained["map50"] + 0.15, (metrics["map50"], untrained["map50"])
    assert abs(metrics["delta_map50"]) <= 0.02  # the engine against PyTorch eager


USER_MODULE = "def build(cfg):\n    return {'family': 'mine'}  # a dict, not an adapter\n"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"factory": "no_such_pkg.models:build"}, "params.yaml: model.factory: "),
        ({"factory": "user_models:build"}, "params.yaml: model.factory: "),
        ({"family": "nosuchfamily"}, "params.yaml: model.family: unknown family 'nosuchfamily'"),
    ],
    ids=["does-not-import", "returns-a-dict", "unknown-family"],
)
def test_unusable_model_is_one_line_exit_2(model, message, tmp_path):
    params = tiny_params()
    params["model"].update(model)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "user_models.py").write_text(USER_MODULE)  # importable from the project dir
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", "params.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not Path(tmp_path / "artifacts" / "train" / "model.pt").exists()
