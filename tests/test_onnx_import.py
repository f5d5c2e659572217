"""Family `onnx` (tasks/models/onnx_import.py): an imported detector's checks, the appended
decode + NMS in ONNX Runtime and OpenVINO, MACs from the graph, INT8 leaving the decode float.

The imported models are real exports made here: a tiny Ultralytics YOLOv8n (3 classes, 64 px,
built from yaml offline, exported by Ultralytics' own ONNX exporter with a dynamic batch) and the
built-in detector exported by `tasks.models.onnx_export.to_onnx`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from tasks.harness.config import ExportCfg, QuantizeCfg
from tasks.harness.errors import DataError
from tasks.harness.signature import OUTPUTS
from tasks.models import onnx_graph, onnx_inspect
from tasks.models import onnx_import as oi
from tasks.models.config import ModelCfg

SIZE, CLASSES, K, FLOOR, IOU = 64, 3, 30, 0.05, 0.6


def _ort(model: onnx.ModelProto | Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})


def _openvino(model: onnx.ModelProto, tmp: Path):
    import openvino as ov

    path = tmp / "ov.onnx"
    onnx.save(model, str(path))
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: [request.infer({0: x})[o] for o in compiled.outputs]


@pytest.fixture(scope="module")
def yolo_onnx(tmp_path_factory) -> Path:
    """Ultralytics' own ONNX export (dynamic batch and size) of a random-weight YOLOv8n with 3
    classes; its class convs are re-drawn so that scores vary by anchor (no ties) and many
    anchors pass the score floor."""
    for key, value in {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false",
                       "YOLO_VERBOSE": "false"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    pytest.importorskip("ultralytics", reason="the yolo extra (Ultralytics) is not installed")
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    tmp = tmp_path_factory.mktemp("yolo")
    spec = {k: v for k, v in yaml_model_load("yolov8n.yaml").items() if k != "yaml_file"}
    (tmp / "yolov8n.yaml").write_text(yaml.safe_dump({**spec, "nc": CLASSES}))
    model = YOLO(str(tmp / "yolov8n.yaml"))
    torch.manual_seed(0)
    with torch.no_grad():
        for conv in model.model.modules():  # He-normal: features that still vary at the head
            if isinstance(conv, torch.nn.Conv2d) and conv.weight.requires_grad:  # not the DFL
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
        for branch in model.model.model[-1].cv3:
            branch[-1].bias.normal_(0.0, 1.0)
    with contextlib.chdir(tmp):  # the exporter writes beside the yaml's bare name
        out = model.export(format="onnx", imgsz=SIZE, dynamic=True, simplify=False, verbose=False)
    return tmp / out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((3, 3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="module")
def appended(yolo_onnx) -> onnx.ModelProto:
    return oi.to_detections(onnx.load(str(yolo_onnx)), CLASSES, K, FLOOR, IOU, input_size=SIZE)


def _reference(raw: np.ndarray, k: int = K) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decode + class-aware NMS of (B, 4 + C, N) with torchvision: per image, the K best
    (boxes xyxy, scores, classes) by score."""
    from torchvision.ops import batched_nms

    out = []
    for pred in torch.from_numpy(raw).transpose(1, 2):  # (N, 4 + C)
        cxcy, wh, scores = pred[:, :2], pred[:, 2:4], pred[:, 4:]
        boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)
        anchor, cls = torch.nonzero(scores > FLOOR, as_tuple=True)
        s = scores[anchor, cls]
        keep = batched_nms(boxes[anchor], s, cls, IOU)[:k]  # sorted by score, descending
        out.append((boxes[anchor][keep].numpy(), s[keep].numpy(), cls[keep].numpy()))
    return out


def _check_against_reference(outputs, raw, k: int = K) -> int:
    num, boxes, scores, classes = outputs
    total = 0
    for j, (ref_boxes, ref_scores, ref_classes) in enumerate(_reference(raw, k)):
        n = int(num[j])
        assert n == len(ref_scores)
        np.testing.assert_allclose(scores[j, :n], ref_scores, atol=1e-5)
        np.testing.assert_allclose(boxes[j, :n], ref_boxes, atol=1e-3)
        np.testing.assert_array_equal(classes[j, :n], ref_classes)
        assert not boxes[j, n:].any() and not scores[j, n:].any() and not classes[j, n:].any()
        total += n
    return total


def test_yolo_raw_decode_matches_reference_in_ort_and_openvino(
    yolo_onnx, appended, images, tmp_path
):
    found = oi.inspect(yolo_onnx, "yolo_raw", CLASSES, SIZE)
    assert (found.num_classes, found.anchors, found.input_size) == (CLASSES, 84, (SIZE, SIZE))
    assert found.dynamic_batch and found.raw_output == "output0"

    assert [o.name for o in appended.graph.output] == OUTPUTS
    types = [o.type.tensor_type.elem_type for o in appended.graph.output]
    assert types == [TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32]
    shapes = [oi._dims(o) for o in appended.graph.output]
    assert shapes == [["batch"], ["batch", K, 4], ["batch", K], ["batch", K]]
    assert [i.name for i in appended.graph.input] == ["images"]
    assert oi._dims(appended.graph.input[0])[1:] == [3, SIZE, SIZE]
    assert oi.detector_end(appended) == "output0"
    decode = oi.decode_nodes(appended)
    assert 30 <= len(decode) <= 60
    assert not any(n.op_type == "Conv" for n in appended.graph.node if n.name in decode)

    raw = _ort(yolo_onnx)(images)[0]  # (3, 7, 84): the imported model's own output
    ort_run, ov_run = _ort(appended), _openvino(appended, tmp_path)
    for batch in (images[:1], images):
        got_ort, got_ov = ort_run(batch), ov_run(batch)
        assert [a.dtype.name for a in got_ort] == ["int32", "float32", "float32", "int32"]
        assert [a.shape for a in got_ort] == [(len(batch),), (len(batch), K, 4),
                                              (len(batch), K), (len(batch), K)]  # fmt: skip
        kept = _check_against_reference(got_ort, raw[: len(batch)])
        assert len(batch) * 10 <= kept < len(batch) * K  # kept some, padded the rest
        np.testing.assert_array_equal(got_ov[0], got_ort[0])
        np.testing.assert_array_equal(got_ov[3], got_ort[3])
        np.testing.assert_allclose(got_ov[2], got_ort[2], atol=1e-4)
        np.testing.assert_allclose(got_ov[1], got_ort[1], atol=1e-2)
    # more boxes survive NMS than K: each image keeps its K best
    capped = oi.to_detections(onnx.load(str(yolo_onnx)), CLASSES, 8, FLOOR, IOU, input_size=SIZE)
    assert _check_against_reference(_ort(capped)(images), raw, 8) == 3 * 8


def _one_output_model(path: Path, out_shape: list, opset: int = 17, channels: int = 8) -> Path:
    """A valid ONNX: images (1, 3, 64, 64) -> 1x1 Conv to `channels` -> Reshape to `out_shape`."""
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [channels, 3, 1, 1], np.ones(3 * channels, np.float32)
    )
    shape = helper.make_tensor("shape", TensorProto.INT64, [len(out_shape)], out_shape)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"], name="conv"),
         helper.make_node("Reshape", ["c", "shape"], ["output0"], name="reshape")],
        "wrong",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, out_shape)],
        [w, shape],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_wrong_outputs_name_found_versus_expected(tmp_path, yolo_onnx):
    heatmap = _one_output_model(tmp_path / "heatmap.onnx", [1, 8, SIZE, SIZE])
    with pytest.raises(DataError) as e:
        oi.inspect(heatmap, "yolo_raw")
    msg = str(e.value)
    assert "\n" not in msg and str(heatmap) in msg
    assert f"found output0 (1,8,{SIZE},{SIZE}) float32" in msg and onnx_inspect.EXPECTED_RAW in msg
    with pytest.raises(DataError, match=r"found output0 \(1,8,4096\) float32; expected num_det"):
        oi.inspect(_one_output_model(tmp_path / "raw.onnx", [1, 8, 4096]), "detections")
    # (B, N, 4 + C) is the transposed layout
    with pytest.raises(DataError, match=r"looks like \(B, N, 4\+C\)"):
        oi.inspect(_one_output_model(tmp_path / "t.onnx", [1, 4096, 8]), "yolo_raw")
    with pytest.raises(DataError, match=r"found output0 \(1,\d+,6\) float32; .* end-to-end"):
        oi.inspect(_one_output_model(tmp_path / "e2e.onnx", [1, 4096, 6], channels=6), "yolo_raw")
    with pytest.raises(DataError, match=rf"{yolo_onnx}: output output0 .* holds 3 class scores; "
                       r"the dataset has 5 classes: expected \(B,9,N\)"):  # fmt: skip
        oi.inspect(yolo_onnx, "yolo_raw", num_classes=5, input_size=SIZE)
    with pytest.raises(DataError, match="symbolic height/width"):
        oi.inspect(yolo_onnx, "yolo_raw")
    with pytest.raises(DataError, match="not a valid ONNX"):
        (tmp_path / "cut.onnx").write_bytes(yolo_onnx.read_bytes()[:5000])
        oi.inspect(tmp_path / "cut.onnx", "yolo_raw", input_size=SIZE)


def test_wrong_input_named(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["output0"])],
        "gray",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
    )
    path = tmp_path / "gray.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(DataError, match=rf"{path}: inputs found: x \(1,1,64,64\) float32; "
                       r"expected one image input \(B,3,H,W\) float32"):  # fmt: skip
        oi.inspect(path, "yolo_raw")


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    """The built-in detector (random weights) and its export with decode (`OUTPUTS`)."""
    from tasks.models.centernet import CenterNetAdapter, Detector, DetectorConfig
    from tasks.models.config import CenterNetCfg
    from tasks.models.onnx_export import to_onnx

    torch.manual_seed(0)
    model = Detector(DetectorConfig(num_classes=CLASSES, input_size=SIZE)).eval()
    path = tmp_path_factory.mktemp("builtin") / "model.onnx"
    adapter = CenterNetAdapter(CenterNetCfg())
    to_onnx(adapter, model, ExportCfg(simplifier="none", max_detections=K), path)
    return model, path


def test_detections_model_passes_and_is_rejected_as_yolo_raw(builtin, images):
    _, path = builtin
    found = oi.inspect(path, "detections", CLASSES, SIZE)
    assert found.outputs["boxes"][1:] == [K, 4]
    kept = oi.to_detections(onnx.load(str(path)), CLASSES, K, FLOOR, IOU,
                            convention="detections", path=path)  # fmt: skip
    assert not oi.decode_nodes(kept) and [o.name for o in kept.graph.output] == OUTPUTS
    for a, b in zip(_ort(kept)(images), _ort(path)(images), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError) as e:
        oi.inspect(path, "yolo_raw", CLASSES, SIZE)
    msg = str(e.value)
    assert msg.startswith(f"{path}: outputs do not match model.outputs: yolo_raw: found ")
    assert f"boxes (batch,{K},4) float32" in msg and msg.endswith(
        "; declare model.outputs: detections"
    )


def test_macs_from_graph_match_torch_pruning(builtin, yolo_onnx, appended):
    from tasks.models.centernet import macs_and_params

    model, path = builtin
    tp_macs, tp_params = macs_and_params(model, SIZE)  # torch-pruning's counter, on PyTorch
    macs, params = oi.macs_and_params(path)
    assert abs(macs - tp_macs) / tp_macs < 0.01, (macs, tp_macs)
    assert abs(params - tp_params) / tp_params < 0.01, (params, tp_params)
    # the appended decode adds no MACs; symbolic sizes need the declared one
    assert oi.macs_and_params(appended) == oi.macs_and_params(yolo_onnx, SIZE)


def test_int8_quantizes_the_detector_and_leaves_the_decode_float(appended, images, tmp_path):
    from tasks.quantization.qdq import calibrate, to_int8

    src, dst, cache = tmp_path / "fp32.onnx", tmp_path / "int8.onnx", tmp_path / "ranges"
    onnx.save(appended, str(src))
    cfg = QuantizeCfg()
    calibrate(src, np.concatenate([images] * 3), cfg, cfg.calibrator, cache)
    dfl = oi.integral_convs(appended)
    assert dfl == ["/model.22/dfl/conv/Conv"]  # the DFL box integral stays float too
    to_int8(src, dst, cache, cfg, cfg.calibrator, exclude=dfl)
    quantized = onnx.load(str(dst))
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    (dfl_node,) = [n for n in quantized.graph.node if n.name == dfl[0]]
    assert producers.get(dfl_node.input[1]) != "DequantizeLinear"
    ops = {n.name: n.op_type for n in quantized.graph.node}
    assert sum(op == "QuantizeLinear" for op in ops.values()) > 50  # the detector's convs
    before = {n.name: n.op_type for n in appended.graph.node if n.name.startswith("decode/")}
    assert {k: v for k, v in ops.items() if k.startswith("decode/")} == before
    decode_inputs = {i for n in quantized.graph.node if n.name in before for i in n.input}
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                   for o in n.output}  # fmt: skip
    assert not decode_inputs & dequantized  # the decode reads float tensors only
    fp32, int8 = _ort(src)(images), _ort(dst)(images)
    int8_ov = _openvino(quantized, tmp_path)(images)
    assert [a.shape for a in int8] == [a.shape for a in int8_ov] == [a.shape for a in fp32]
    assert int8[0].min() > 0 and int8_ov[0].min() > 0  # still detects


def test_adapter_marks_torch_stages_unsupported(yolo_onnx, tmp_path):
    from tasks.harness.errors import ConfigError
    from tasks.models import ModelAdapter, adapter_for

    cfg = ModelCfg(
        family="onnx", path=str(yolo_onnx.parent), onnx=str(yolo_onnx), outputs="yolo_raw"
    )
    adapter = adapter_for(cfg)
    assert isinstance(adapter, ModelAdapter) and adapter.torch_stages is False
    assert adapter.skipped == "skipped: imported ONNX"
    assert adapter.imported_onnx() == yolo_onnx
    with pytest.raises(ConfigError, match="training needs a PyTorch model"):
        adapter.loss(None, None, [], [])
    facts = adapter.prepare(tmp_path / "model.onnx", num_classes=CLASSES, input_size=SIZE,
                            max_detections=K, score_floor=FLOOR)  # fmt: skip
    assert facts["convention"] == "yolo_raw" and facts["anchors"] == 84
    assert facts["macs"] == oi.macs_and_params(yolo_onnx, SIZE)[0]
    oi.inspect(tmp_path / "model.onnx", "detections", CLASSES, SIZE)


def test_the_reference_of_an_imported_onnx_is_its_prepared_graph(yolo_onnx, tmp_path):
    """The reference stage on family onnx: no checkpoint is read; the reference graph is the
    imported file prepared at the pipeline's size, its facts what evaluate reports for it."""
    from tasks import reference
    from tasks.models.reference_graph import read

    cfg = ModelCfg(
        family="onnx", path=str(yolo_onnx.parent), onnx=str(yolo_onnx), outputs="yolo_raw"
    )
    manifest = {"splits": {"train": {"categories": [{"id": i} for i in range(CLASSES)]}}}
    export_cfg = ExportCfg(max_detections=K, score_floor=FLOOR)
    facts = reference.run(
        export_cfg, checkpoint=tmp_path / "no-such.pt", manifest=manifest, out=tmp_path,
        model_cfg=cfg, input_size=SIZE,
    )  # fmt: skip
    assert facts["imported"] is True and facts["input_size"] == SIZE
    assert facts["size_mb"] == yolo_onnx.stat().st_size / 2**20
    assert facts["macs"] == oi.macs_and_params(tmp_path / "model.onnx")[0] > 0
    assert read(tmp_path) == {**facts, "onnx": tmp_path / "model.onnx"}
    found = oi.inspect(tmp_path / "model.onnx", "detections", CLASSES, SIZE)
    assert found.num_classes == CLASSES  # the project's outputs: decode + NMS appended
    (tmp_path / "reference.json").unlink()
    with pytest.raises(DataError, match="reference.json: file not found"):
        read(tmp_path)


def test_old_opset_is_converted_and_fixed_batch_refused(tmp_path):
    path = _one_output_model(tmp_path / "old.onnx", [1, 8, 4096], opset=11)  # C = 4
    model = oi.to_detections(onnx.load(str(path)), 4, K, FLOOR, IOU, path=path)
    assert onnx_graph.opset(model) == oi.MIN_OPSET
    num, boxes, _, _ = _ort(model)(np.random.default_rng(1).random((1, 3, SIZE, SIZE), np.float32))
    assert boxes.shape == (1, K, 4) and 0 < num[0] <= K
    cfg = ModelCfg(family="onnx", path=str(path.parent), onnx=str(path), outputs="yolo_raw")
    with pytest.raises(DataError, match=rf"{path}: input images has a fixed batch of 1"):
        oi.prepare(cfg, tmp_path / "out.onnx", num_classes=4, input_size=SIZE,
                   max_detections=K, score_floor=FLOOR)  # fmt: skip


def test_litert_folds_the_shape_arithmetic_of_ultralytics_export_and_matches_ort(
    appended, images, tmp_path
):
    """Ultralytics' own export takes the batch size and anchor count from Shape ops inside the
    head: cut as it is, its decode would read int64 scalars out of the .tflite (`split` names
    them). `convert` first fixes the graph at batch 1 and folds that arithmetic (onnxsim); the
    float32 .tflite with its batch-1 decode, run image by image, gives ONNX Runtime's detections
    for a batch of three."""
    from tasks.engines import litert, litert_graph

    if reason := litert.unavailable():
        pytest.skip(reason)
    path = tmp_path / "model.onnx"
    onnx.save(appended, str(path))
    with pytest.raises(litert.Unconvertible, match=r"shape values computed in the backbone \("):
        litert_graph.split(path, tmp_path / "head.onnx", tmp_path / "decode.onnx")
    facts = litert.convert(path, tmp_path / "model.tflite", "float32")
    assert facts["batch1_folded"] and facts["cut"]
    got = litert.runner(tmp_path / "model.tflite", threads=1)(images)
    want = _ort(appended)(images)
    np.testing.assert_array_equal(got[0], want[0])
    assert want[0].min() > 0  # every image has detections to compare
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3)
