"""Each engine target on the tiny profile: builds, runs, keeps PyTorch's accuracy, and really
executes INT8 when given an INT8 model; TensorRT reports why it is skipped."""

import json

import pytest
import torch

from tasks import build_engine, evaluate, quantize
from tasks.datasets.coco import DetectionSet
from tasks.engines import check_int8, get, litert
from tasks.engines.tensorrt_gpu import unavailable
from tasks.harness.config import BuildEngineCfg
from tasks.harness.errors import GateFailed, ShrinkflowError
from tasks.metrics.detection import coco_metrics, predict
from tasks.models import load_checkpoint

CPU_TARGETS = ["onnxruntime", "openvino"]


def eager_map(checkpoint, test, tiny):
    adapter, model, _ = load_checkpoint(checkpoint)
    wrapped = adapter.deployable(
        model, tiny.export.max_detections, tiny.export.score_floor, fold=False
    )

    def run(x):
        with torch.no_grad():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    return coco_metrics(test.coco, predict(run, test), 0.3)["map50"]


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_cpu_target_builds_runs_and_keeps_pytorch_accuracy(
    tiny, tiny_manifest, models, target, tmp_path
):
    facts = build_engine.run(
        tiny.build_engine, target=target, onnx_path=models / "fp32.onnx", out=tmp_path / "engine"
    )
    assert facts["status"] == "ok" and facts["size_mb"] > 0
    assert set(facts["conv_precisions"]) == {"f32"}  # f32 hint: OpenVINO must not run bf16
    runner = get(target).load(tmp_path / "engine", tiny.build_engine)
    test = DetectionSet(tiny_manifest, "test", 64)
    got = coco_metrics(test.coco, predict(runner, test), 0.3)["map50"]
    ref = eager_map(models / "model.pt", test, tiny)
    assert ref > 0.1
    assert abs(got - ref) <= 0.02, (target, got, ref)


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_int8_target_really_executes_int8_kernels(tiny, models, target, tmp_path):
    facts = build_engine.run(
        tiny.build_engine, target=target, onnx_path=models / "int8.onnx", out=tmp_path / "engine"
    )
    int8 = sum(v for k, v in facts["conv_precisions"].items() if k in ("int8", "u8", "i8"))
    assert int8 == 14, facts["conv_precisions"]  # every convolution, read from the runtime


def test_a_quantized_model_running_in_float_is_caught(models):
    with pytest.raises(GateFailed, match="no convolution executes in INT8"):
        check_int8(models / "int8.onnx", {"f32": 14}, "some-runtime")
    check_int8(models / "fp32.onnx", {"f32": 14}, "some-runtime")  # float model: fine


def test_openvino_bf16_is_a_precision_of_its_own(tiny, models, tmp_path):
    cfg = tiny.build_engine.model_copy(update={"openvino_precision": "bf16"})
    facts = build_engine.run(
        cfg, target="openvino", onnx_path=models / "fp32.onnx", out=tmp_path / "engine"
    )
    assert facts["inference_precision_hint"] == "bf16"
    # On a CPU without bf16 support OpenVINO falls back to f32, and the facts say so.
    assert facts["inference_precision_used"] in ("bf16", "f32")
    assert set(facts["conv_precisions"]) == {facts["inference_precision_used"]}


@pytest.mark.skipif(unavailable() is None, reason="TensorRT and a CUDA device are present")
def test_tensorrt_without_cuda_or_tensorrt_is_skipped_with_the_reason(
    tiny, tiny_manifest, models, tmp_path
):
    facts = build_engine.run(
        tiny.build_engine,
        target="tensorrt",
        onnx_path=models / "fp32.onnx",
        out=tmp_path / "engine",
    )
    assert facts["status"].startswith("skipped: ")
    assert facts["status"] == unavailable()
    assert (
        json.loads((tmp_path / "engine" / "engine.json").read_text())["status"] == facts["status"]
    )
    metrics, curve = evaluate.run(
        tiny.evaluate,
        target="tensorrt",
        engine_dir=tmp_path / "engine",
        model_checkpoint=models / "model.pt",
        baseline_checkpoint=models / "model.pt",
        reference_dir=tmp_path / "no-reference",  # not read: the target was skipped
        manifest=tiny_manifest,
        engine_cfg=tiny.build_engine,
        export_cfg=tiny.export,
        work=tmp_path,
    )
    assert metrics == {"target": "tensorrt", "status": facts["status"]} and curve == []


@pytest.mark.gpu
@pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))
def test_tensorrt_builds_fp16_and_int8_engines_that_match_onnxruntime(
    tiny, tiny_manifest, models, tmp_path
):
    test = DetectionSet(tiny_manifest, "test", 64)
    for name in ("fp32.onnx", "int8.onnx"):
        facts = build_engine.run(
            tiny.build_engine, target="tensorrt", onnx_path=models / name, out=tmp_path / name
        )
        assert facts["status"] == "ok" and "trtexec" in facts
        runner = get("tensorrt").load(tmp_path / name, tiny.build_engine)
        got = coco_metrics(test.coco, predict(runner, test), 0.3)["map50"]
        assert abs(got - eager_map(models / "model.pt", test, tiny)) <= 0.03


def test_engine_cfg_rejects_an_unknown_target():
    with pytest.raises(ValueError, match="'openvino', 'tensorrt' or 'litert'"):
        BuildEngineCfg(targets=["tflite"])


def test_bench_sizes_times_every_variant_at_every_size(tiny, tiny_manifest, models, tmp_path):
    """The size benchmark rebuilds the same weights at each size and times every variant
    (no timing is asserted: only that each variant ran and the ratios are derived from it)."""
    from tasks.cli import bench_sizes

    loaded = load_checkpoint(models / "model.pt")
    model = loaded[1]
    _, bigger = bench_sizes.at_size(loaded, models / "model.pt", 96)
    assert bigger.cfg.input_size == 96
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bench_sizes.at_size(loaded, models / "model.pt", 64)[1](x), model(x))
    report = tmp_path / "report.json"
    # each runtime's model made as quantize made it for that runtime (quantize.method)
    targets = {"onnxruntime": {"method": "ort"}, "openvino": {"method": "nncf"}}
    report.write_text(json.dumps({"precision": "int8", "layer_precision": {}, "targets": targets}))
    (tmp_path / "manifest.json").write_text(json.dumps(tiny_manifest))
    result = bench_sizes.run(
        tiny,
        trained=models / "model.pt",
        compressed=models / "model.pt",
        quantize_report=report,
        manifest=tmp_path / "manifest.json",
        sizes=[64, 96],
        runs=4,
        rounds=1,
    )
    assert set(result["sizes"]) == {"64", "96"}
    assert result["methods"] == {"onnxruntime": "ort", "openvino": "nncf"}
    variants = {"eager_fp32", "onnxruntime_fp32", "openvino_fp32", "openvino_bf16"}
    variants |= {f"{t}_compressed" for t in CPU_TARGETS}
    for per_size in result["sizes"].values():
        assert set(per_size["latency"]) == variants
        assert all(v["latency_ms_p50"] > 0 for v in per_size["latency"].values())
        p50 = {k: v["latency_ms_p50"] for k, v in per_size["latency"].items()}
        assert per_size["ratios"]["onnxruntime_compressed_vs_eager"] == pytest.approx(
            p50["eager_fp32"] / p50["onnxruntime_compressed"]
        )


# LiteRT: onnx2tf conversion and ai-edge-litert's interpreter, for real (the `litert` extra,
# installed by .ci/setup); skipped here only where the extra is not installed, with the reason.
litert_missing = pytest.mark.skipif(
    litert.unavailable() is not None, reason=str(litert.unavailable())
)


@litert_missing
def test_litert_fp32_and_int8_run_on_xnnpack_and_keep_pytorch_accuracy(
    tiny, tiny_manifest, models, tmp_path, monkeypatch
):
    """Both conversions with no download (onnx2tf fetches sample images unless given ours);
    the INT8 build's gate fails a model whose convolutions all read float."""
    import requests

    def no_download(*args, **kwargs):
        raise AssertionError(f"download at run time: {args}")

    monkeypatch.setattr(requests, "get", no_download)
    test = DetectionSet(tiny_manifest, "test", 64)
    ref = eager_map(models / "model.pt", test, tiny)
    # float32: converted from the ONNX by the build itself
    facts = build_engine.run(
        tiny.build_engine, target="litert", onnx_path=models / "fp32.onnx", out=tmp_path / "f32"
    )
    assert facts["status"] == "ok" and facts["precision"] == "float32"
    assert facts["delegate"] == "XNNPACK" and facts["xnnpack_ops"]["CONV_2D"] == 14
    assert facts["conv_precisions"] == {"f32": 14} and facts["size_mb"] > 0
    runner = get("litert").load(tmp_path / "f32", tiny.build_engine)
    assert abs(coco_metrics(test.coco, predict(runner, test), 0.3)["map50"] - ref) <= 0.02
    # full-integer INT8, calibrated on quantize's calibration images, as quantize makes it
    made = tmp_path / "made"
    made.mkdir()
    (made / "model.onnx").write_bytes((models / "fp32.onnx").read_bytes())
    images, _, _ = quantize.calibration_set(tiny.quantize, DetectionSet(tiny_manifest, "train", 64))
    litert.convert(made / "model.onnx", made / "model.tflite", "int8", images)
    facts = build_engine.run(
        tiny.build_engine, target="litert", onnx_path=made / "model.onnx", out=tmp_path / "i8"
    )
    assert facts["source"] == "model.tflite" and facts["precision"] == "int8"
    assert facts["conv_precisions"] == {"int8": 14}  # every convolution reads int8
    assert facts["xnnpack_ops"]["CONV_2D"] == 14  # ... and XNNPACK runs it
    runner = get("litert").load(tmp_path / "i8", tiny.build_engine)
    got = coco_metrics(test.coco, predict(runner, test), 0.3)["map50"]
    assert abs(got - ref) <= 0.05, (got, ref)
    size = {k: (tmp_path / k / "model.tflite").stat().st_size for k in ("f32", "i8")}
    assert size["i8"] < 0.4 * size["f32"]
    interpreter = litert._interpreter(made / "model.tflite", 1)
    with pytest.raises(GateFailed, match="no convolution reads int8"):
        litert.check_int8(made / "model.tflite", interpreter, {"f32": 14})


def test_litert_without_its_extra_reports_the_reason():
    reason = litert.unavailable(("shrinkflow_no_such_runtime",))
    assert reason.startswith("skipped: shrinkflow_no_such_runtime not installed")
    assert "pip install '.[litert]'" in reason
    assert litert.unavailable(("numpy",)) is None


def test_trtexec_line_carries_the_profile_shapes(tiny, tmp_path):
    from tasks.engines.tensorrt_gpu import trtexec_command

    line = trtexec_command(
        tmp_path / "model.onnx", tmp_path / "model.engine", tiny.build_engine, True, (3, 64, 64)
    )
    lo, opt, hi = tiny.build_engine.tensorrt_batch
    assert f"--minShapes=images:{lo}x3x64x64" in line
    assert f"--optShapes=images:{opt}x3x64x64" in line
    assert f"--maxShapes=images:{hi}x3x64x64" in line and "--int8" in line


def test_litert_head_outputs_go_back_to_the_layout_the_decode_reads():
    """onnx2tf's channels-last outputs go back to the ONNX layout ((1, H, W, C) -> (B, C, H, W),
    (1, N, C) -> (B, C, N)); one it left in the ONNX layout stays; a shape that fits neither
    is an error naming the tensor and both shapes."""
    assert litert._layout("p3", [1, 8, 8, 3], ["batch", 3, 8, 8]) == (0, 3, 1, 2)
    assert litert._layout("dfl", [1, 84, 4], ["batch", 4, 84]) == (0, 2, 1)
    assert litert._layout("dfl", [1, 4, 84], ["batch", 4, 84]) == (0, 1, 2)
    with pytest.raises(ShrinkflowError, match=r"'p3' has shape \[1, 8, 8, 4\], which is neither"):
        litert._layout("p3", [1, 8, 8, 4], ["batch", 3, 8, 8])
