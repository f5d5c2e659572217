"""The core function of train, export, build_engine and evaluate on the tiny data."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tasks import build_engine, evaluate, export, reference, train
from tasks.datasets.coco import DetectionSet
from tasks.engines import get
from tasks.harness.errors import ConfigError
from tasks.models import OUTPUTS, load_checkpoint
from tasks.models.centernet import Detector, DetectorConfig, make_targets
from tasks.models.onnx_export import parity


@pytest.fixture(scope="module")
def trained(tiny, adapter, tiny_manifest, tmp_path_factory):
    """A short training run on the tiny data; its checkpoint path and history."""
    cfg = tiny.train.model_copy(update={"epochs": 6})
    size = cfg.input_size
    model, history = train.run(
        adapter,
        cfg,
        train=DetectionSet(tiny_manifest, "train", size),
        val=DetectionSet(tiny_manifest, "val", size),
    )
    path = tmp_path_factory.mktemp("train") / "model.pt"
    cats = tiny_manifest["splits"]["train"]["categories"]
    adapter.save(path, model, cats, {"train_cfg": cfg.model_dump(mode="json")})
    return path, history


def test_targets_mark_each_object_centre():
    boxes = [np.array([[8, 8, 24, 24], [40, 0, 64, 16]], np.float32)]
    heat, reg, mask = make_targets(boxes, [np.array([3, 7])], num_classes=10, size=64)
    assert heat.shape == (1, 10, 16, 16) and reg.shape == (1, 4, 16, 16)
    assert mask.sum() == 2
    assert heat[0, 3, 4, 4] == 1.0 and heat[0, 7, 2, 13] == 1.0
    assert reg[0, :2, 4, 4].tolist() == [4.0, 4.0]  # w, h in stride-4 cells


def test_training_lowers_the_loss_and_checkpoint_round_trips(trained):
    path, history = trained
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    _, model, ckpt = load_checkpoint(path)  # weights_only=True inside
    assert ckpt["config"]["input_size"] == 64 and ckpt["family"] == "centernet"
    x = torch.rand(2, 3, 64, 64)
    assert model(x).shape == (2, 14, 16, 16)


def test_width_knob_scales_the_model():
    small = Detector(DetectorConfig(width=0.5))
    big = Detector(DetectorConfig(width=1.0))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(big) > 3 * n(small)


def test_export_has_the_detection_signature_and_dynamic_batch(
    tiny, trained, tiny_manifest, tmp_path
):
    path, _ = trained
    out = tmp_path / "model.onnx"
    result = export.run(tiny.export, checkpoint=path, manifest=tiny_manifest, out=out)
    assert result["parity_max_abs_diff"] <= tiny.export.parity_tolerance
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == OUTPUTS
    assert model.opset_import[0].version >= 17
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        num, boxes, scores, classes = sess.run(
            None, {"images": np.random.rand(batch, 3, 64, 64).astype(np.float32)}
        )
        assert num.shape == (batch,) and boxes.shape == (batch, 100, 4)
        assert scores.shape == classes.shape == (batch, 100)


def test_parity_gate_fails_on_a_different_model(tiny, trained, tiny_manifest, tmp_path):
    path, _ = trained
    out = tmp_path / "model.onnx"
    export.run(tiny.export, checkpoint=path, manifest=tiny_manifest, out=out)
    adapter, other, _ = load_checkpoint(path)
    with torch.no_grad():
        other.out.bias += 1.0  # shift every score: the ONNX no longer matches this model
    images = DetectionSet(tiny_manifest, "test", 64).batch(slice(0, 4))
    result = parity(adapter, other, out, images, tiny.export)
    assert result["parity_max_abs_diff"] > tiny.export.parity_tolerance


def test_engine_and_evaluate_against_eager(tiny, trained, tiny_manifest, tmp_path):
    path, _ = trained
    onnx_path = tmp_path / "model.onnx"
    export.run(tiny.export, checkpoint=path, manifest=tiny_manifest, out=onnx_path)
    built = build_engine.run(
        tiny.build_engine, target="onnxruntime", onnx_path=onnx_path, out=tmp_path / "engine"
    )
    assert built["status"] == "ok" and built["threads"] == tiny.build_engine.threads
    assert (tmp_path / "engine" / "model.ort.onnx").exists()
    (tmp_path / "work").mkdir()
    facts = reference.run(
        tiny.export, checkpoint=path, manifest=tiny_manifest, out=tmp_path / "reference"
    )
    assert facts["imported"] is False and (tmp_path / "reference" / "model.onnx").exists()
    assert facts["parity_max_abs_diff"] <= tiny.export.parity_tolerance
    metrics, curve = evaluate.run(
        tiny.evaluate,
        target="onnxruntime",
        engine_dir=tmp_path / "engine",
        model_checkpoint=path,
        baseline_checkpoint=path,
        reference_dir=tmp_path / "reference",
        work=tmp_path / "work",
        manifest=tiny_manifest,
        engine_cfg=tiny.build_engine,
        export_cfg=tiny.export,
    )
    assert metrics["status"] == "ok"
    assert abs(metrics["delta_map50"]) < 0.01  # same FP32 graph, another runtime
    for k in ("map50", "map50_95", "precision", "recall"):
        assert 0 <= metrics[k] <= 1
    assert metrics["latency_ms_p95"] >= metrics["latency_ms_p50"] > 0
    assert metrics["throughput_ips"] > 0 and metrics["macs"] > 0
    assert metrics["baseline"]["name"] == "pytorch_eager_fp32"
    assert metrics["fp32_same_runtime"]["map50"] == pytest.approx(metrics["map50"], abs=0.01)
    assert metrics["speedup_vs_fp32_same_runtime"] > 0 and metrics["macs_reduction"] == 0
    # the uncompressed model's MACs and file size come from the reference stage's record
    adapter, model, _ = load_checkpoint(path)
    assert metrics["baseline"]["macs"] == facts["macs"] == adapter.macs_and_params(model)[0]
    assert metrics["baseline"]["size_mb"] == pytest.approx(path.stat().st_size / 2**20)
    assert len(curve) == 101


def test_eager_and_engine_give_the_same_detections(tiny, trained, tiny_manifest, tmp_path):
    path, _ = trained
    onnx_path = tmp_path / "model.onnx"
    export.run(tiny.export, checkpoint=path, manifest=tiny_manifest, out=onnx_path)
    build_engine.run(
        tiny.build_engine, target="onnxruntime", onnx_path=onnx_path, out=tmp_path / "engine"
    )
    runner = get("onnxruntime").load(tmp_path / "engine", tiny.build_engine)
    adapter, model, _ = load_checkpoint(path)
    x = DetectionSet(tiny_manifest, "test", 64).batch(slice(0, 2))
    with torch.no_grad():
        deployable = adapter.deployable(model, 100, tiny.export.score_floor, fold=False)
        ref = deployable(torch.from_numpy(x))
    got = runner(x)
    top = ref[2][:, :5].numpy()
    np.testing.assert_allclose(got[2][:, :5], top, atol=1e-4)


def test_unknown_engine_target_names_the_choices():
    with pytest.raises(ConfigError, match="unsupported engine target 'tensorrtx'; choose one of"):
        get("tensorrtx")
