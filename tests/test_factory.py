"""A user's own model family through `model.factory` (tests/fixtures/my_detector.py, a grid
detector unlike the built-in one): train -> export -> build_engine -> evaluate with the real
stage functions, and the one-line errors of a factory that is not usable."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import yaml

from tasks import build_engine, evaluate, export, reference, train
from tasks.datasets.coco import DetectionSet
from tasks.models import load_checkpoint
from tasks.models.training import evaluate_model
from tests.conftest import tiny_params

FACTORY = "tests.fixtures.my_detector:build"


def test_user_family_trains_exports_and_evaluates(tiny, tiny_manifest, tmp_path):
    """The factory's adapter through the stages' own functions, as the pipeline calls them."""
    from tasks.models import adapter_for

    model_cfg = tiny.model.model_copy(update={"factory": FACTORY})
    adapter = adapter_for(model_cfg)
    cfg = tiny.train.model_copy(update={"epochs": 10, "threads": 1})
    train_set = DetectionSet(tiny_manifest, "train", cfg.input_size)
    val = DetectionSet(tiny_manifest, "val", cfg.input_size)
    untrained = evaluate_model(adapter, adapter.build(len(train_set.categories), 64, cfg.seed), val)
    model, history = train.run(adapter, cfg, train=train_set, val=val)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    ckpt_path = tmp_path / "model.pt"
    adapter.save(ckpt_path, model, train_set.categories, {"train_cfg": cfg.model_dump(mode="json")})

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
    reference.run(
        export_cfg, checkpoint=ckpt_path, manifest=tiny_manifest, out=tmp_path / "reference",
        model_cfg=model_cfg,
    )  # fmt: skip
    metrics, _ = evaluate.run(
        tiny.evaluate,
        target="onnxruntime",
        engine_dir=tmp_path / "engine",
        model_checkpoint=ckpt_path,
        baseline_checkpoint=ckpt_path,
        reference_dir=tmp_path / "reference",
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
CASES = {  # model section -> the start of the one error line
    "does-not-import": (
        {"factory": "no_such_pkg.models:build"},
        "params.yaml: model.factory: 'no_such_pkg.models:build' does not import",
    ),
    "returns-a-dict": (
        {"factory": "user_models:build"},
        "params.yaml: model.factory: 'user_models:build' returned dict, not a ModelAdapter",
    ),
    "unknown-family": ({"family": "nosuchfamily"}, "params.yaml: model.family: unknown family"),
}


def test_unusable_model_is_one_line_exit_2(tmp_path):
    """`python -m tasks.train` with each bad model section (the three run side by side: each
    costs a Python start with torch and MLflow; each has its own MLflow store, as SQLite schema
    creation does not take concurrent writers)."""
    procs = {}
    for case, (model, _) in CASES.items():
        work = tmp_path / case
        work.mkdir()
        params = tiny_params()
        params["model"].update(model)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (work / "user_models.py").write_text(USER_MODULE)  # importable from the project dir
        procs[case] = subprocess.Popen(
            [sys.executable, "-m", "tasks.train", "--params", "params.yaml"],
            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"},
        )  # fmt: skip
    try:
        for case, proc in procs.items():
            _, stderr = proc.communicate(timeout=300)
            errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
            assert proc.returncode == 2, (case, stderr)
            assert len(errors) == 1, (case, stderr)
            assert errors[0].startswith(f"error: {CASES[case][1]}"), (case, stderr)
            assert "Traceback" not in stderr, (case, stderr)
            assert not (tmp_path / case / "artifacts" / "train" / "model.pt").exists()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
