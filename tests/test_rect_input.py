"""A rectangular model input, `train.input_size: [w, h]`: params, the built-in detector's targets
and decode, training, ONNX export, every CPU engine, an imported ONNX, and the box round trip.

The input here is [96, 64] (width, height): arrays are (64, 96) and NCHW tensors (N, 3, 64, 96).
A swap of width and height anywhere puts boxes at the wrong pixels or breaks a shape check.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from tasks import build_engine, export, train
from tasks.datasets.coco import DetectionSet
from tasks.engines import get, litert
from tasks.engines.tensorrt_gpu import trtexec_command
from tasks.harness.config import Params, load_params
from tasks.harness.errors import ConfigError, DataError
from tasks.metrics.detection import coco_metrics, predict
from tasks.models import adapter_for
from tasks.models import onnx_import as oi
from tasks.models.centernet import decode, make_targets

W, H = 96, 64  # the model input, width x height


def test_params_take_a_side_or_width_height_and_check_the_family_stride(tmp_path, adapter):
    from tasks.models.config import ModelCfg

    assert adapter.input_stride == ModelCfg().input_stride == 16  # params say what the model says
    assert Params.model_validate({"train": {"input_size": 64}}).train.input_size == (64, 64)
    assert Params.model_validate({"train": {"input_size": [W, H]}}).train.input_size == (W, H)
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  input_size: [96, 70]\n")
    wrong = r"params.yaml: train.input_size: \[96, 70\] \(width, height\) is not a multiple of 16"
    with pytest.raises(ConfigError, match=wrong + r".*'centernet'.*e.g. \[96, 64\]"):
        load_params(bad)
    bad.write_text("model:\n  family: yolo\ntrain:\n  input_size: [320, 240]\n")
    with pytest.raises(ConfigError, match=r"train.input_size: .* multiple of 32.*'yolo'"):
        load_params(bad)
    bad.write_text("train:\n  input_size: [96, 64, 3]\n")
    with pytest.raises(ConfigError, match=r"train.input_size: .*one side or \[width, height\]"):
        load_params(bad)


def test_the_label_qa_fold_input_takes_a_side_or_width_height_with_the_same_stride_check(tmp_path):
    """`label_qa.model.input_size` (the cross-fit detector's input) reads as train's does."""
    qa = Params.model_validate({"label_qa": {"model": {"input_size": 64}}}).label_qa.model
    assert qa.input_size == (64, 64)
    qa = Params.model_validate({"label_qa": {"model": {"input_size": [W, H]}}}).label_qa.model
    assert qa.input_size == (W, H)
    bad = tmp_path / "params.yaml"
    bad.write_text("label_qa:\n  model:\n    input_size: [96, 70]\n")
    wrong = r"params.yaml: label_qa.model.input_size: \[96, 70\] \(width, height\) is not a mul"
    with pytest.raises(ConfigError, match=wrong + r".*'centernet'.*e.g. \[96, 64\]"):
        load_params(bad)
    bad.write_text("label_qa:\n  model:\n    input_size: [96, 64, 3]\n")
    with pytest.raises(ConfigError, match=r"label_qa.model.input_size: .*one side or \[width, h"):
        load_params(bad)


def test_bench_sizes_reads_sides_and_rectangles_and_rebuilds_the_weights_at_a_rectangle(
    tmp_path, tiny, adapter
):
    from tasks.cli import bench_sizes
    from tasks.models import load_checkpoint

    sizes = bench_sizes.input_sizes(["128", "96x64", "96,64", [W, H], 64], tiny)
    assert sizes == [(128, 128), (W, H), (W, H), (W, H), (64, 64)]
    assert [bench_sizes.size_key(s) for s in sizes[:2]] == ["128", "96x64"]
    with pytest.raises(ConfigError, match=r"--size: \[96, 70\] .* multiple of 16.*\[96, 64\]"):
        bench_sizes.input_sizes(["96x70"], tiny)
    with pytest.raises(ConfigError, match=r"--size 96x64x3: expected one side or \[width, he"):
        bench_sizes.input_sizes(["96x64x3"], tiny)
    with pytest.raises(ConfigError, match=r"--size big: expected a side \(128\) or WIDTHxHEIGHT"):
        bench_sizes.input_sizes(["big"], tiny)
    model = adapter.build(3, 64, 0)
    adapter.save(tmp_path / "model.pt", model, [{"id": k, "name": str(k)} for k in (1, 2, 3)], {})
    loaded = load_checkpoint(tmp_path / "model.pt")
    _, wide = bench_sizes.at_size(loaded, tmp_path / "model.pt", (W, H))
    assert adapter.input_size(wide) == (W, H)
    x = torch.rand(1, 3, H, W)
    with torch.no_grad():  # the same weights: the square model gives the same maps on the input
        assert torch.equal(wide.eval()(x), model.eval()(x))


def test_targets_then_decode_give_the_boxes_back_on_a_rectangular_grid():
    """make_targets on the (H/4, W/4) grid, read back by the deployed decode: a box in the
    wide input's right part (x > H) comes back where it was, so x and y are not swapped."""
    boxes = [np.array([[70.0, 10.0, 90.0, 30.0], [8.0, 40.0, 24.0, 60.0]], np.float32)]
    labels = [np.array([1, 0])]
    heat, reg, mask = make_targets(boxes, labels, 2, (W, H))
    assert heat.shape == (1, 2, H // 4, W // 4) and mask.sum() == 2
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    num, got, scores, classes = decode(torch.cat([logits, reg], 1), 2, 2, 0.5, (W, H))
    assert int(num[0]) == 2 and sorted(classes[0].tolist()) == [0, 1]
    order = classes[0].argsort(descending=True)
    assert np.allclose(got[0, order].numpy(), boxes[0], atol=1e-4)


@pytest.fixture(scope="module")
def rect(tiny, tiny_manifest, tmp_path_factory):
    """The tiny detector at [96, 64], trained 1 epoch (4 steps: seconds) on 64 of the tiny
    data's 64x64 images (padded left and right), saved and exported by the export stage's own
    function."""
    tmp = tmp_path_factory.mktemp("rect")
    adapter = adapter_for(tiny.model)
    cfg = tiny.train.model_copy(update={"epochs": 1, "input_size": (W, H)})
    coco = tiny_manifest["splits"]["train"]
    images = coco["images"][:64]
    keep = {im["id"] for im in images}
    few = {**coco, "images": images,
           "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}  # fmt: skip
    subset = {**tiny_manifest, "splits": {**tiny_manifest["splits"], "train": few}}
    tr, va = (DetectionSet(subset, s, (W, H)) for s in ("train", "val"))
    model, history = train.run(adapter, cfg, train=tr, val=va)
    assert np.isfinite(history[-1]["train_loss"])
    adapter.save(tmp / "model.pt", model, tiny_manifest["splits"]["train"]["categories"], {})
    facts = export.run(
        tiny.export, checkpoint=tmp / "model.pt", manifest=tiny_manifest, out=tmp / "model.onnx"
    )
    return adapter, model.eval(), tmp, facts


def test_the_rectangular_detector_exports_as_n_3_h_w_with_parity(rect):
    adapter, model, tmp, facts = rect
    assert adapter.input_size(model) == (W, H)
    assert facts["parity_max_abs_diff"] <= 1e-3 and facts["parity_count_mismatch"] == 0
    dims = onnx.load(str(tmp / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, H, W]
    macs_rect = adapter.macs_and_params(model)[0]
    square = adapter.build(adapter.num_classes(model), H, 0).eval()
    assert macs_rect > adapter.macs_and_params(square)[0]  # 96x64 has more pixels than 64x64


def _same_detections(got, ref, floor=0.05, atol=0.01):
    """Every detection of `ref` scoring >= floor has one of the same class in `got` (any rank:
    near-equal scores may swap) within `atol` in box pixels and score; returns how many."""
    count = 0
    for i in range(len(ref[0])):
        for box, score, cls in zip(ref[1][i], ref[2][i], ref[3][i], strict=True):
            if score < floor:
                break  # scores are sorted descending
            same = np.asarray(got[3][i]) == cls
            d = np.abs(np.asarray(got[1][i])[same] - box).max(axis=1)
            d = np.maximum(d, np.abs(np.asarray(got[2][i])[same] - score))
            assert same.any() and d.min() <= atol, (i, box, score, cls)
            count += 1
    return count


def _eager(adapter, model, tiny):
    wrapped = adapter.deployable(
        model, tiny.export.max_detections, tiny.export.score_floor, fold=False
    )

    def run(x):
        with torch.inference_mode():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    return run


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_cpu_engines_run_the_rectangular_graph_like_pytorch(rect, tiny, tiny_manifest, target,
                                                            tmp_path):  # fmt: skip
    adapter, model, tmp, _ = rect
    facts = build_engine.run(
        tiny.build_engine, target=target, onnx_path=tmp / "model.onnx", out=tmp_path / "engine"
    )
    assert facts["status"] == "ok"
    runner = get(target).load(tmp_path / "engine", tiny.build_engine)
    test = DetectionSet(tiny_manifest, "test", (W, H))
    assert test.batch(slice(0, 2)).shape == (2, 3, H, W)
    got, ref = predict(runner, test), predict(_eager(adapter, model, tiny), test)
    m_got = coco_metrics(test.coco, got, 0.3)["map50"]
    m_ref = coco_metrics(test.coco, ref, 0.3)["map50"]
    assert abs(m_got - m_ref) <= 0.02, (target, m_got, m_ref)
    x = test.batch(slice(0, 4))
    out = runner(x)
    boxes = np.asarray(out[1])
    assert boxes.min() >= 0 and boxes[..., 0::2].max() <= W and boxes[..., 1::2].max() <= H
    assert _same_detections(out, _eager(adapter, model, tiny)(x)) > 0


@pytest.mark.slow
@pytest.mark.skipif(litert.unavailable() is not None, reason=str(litert.unavailable()))
def test_litert_runs_the_rectangular_graph_like_pytorch(rect, tiny, tiny_manifest, tmp_path):
    """onnx2tf turns NCHW into NHWC: a width/height swap there would change every box."""
    adapter, model, tmp, _ = rect
    facts = build_engine.run(
        tiny.build_engine, target="litert", onnx_path=tmp / "model.onnx", out=tmp_path / "engine"
    )
    assert facts["status"] == "ok"
    assert facts["input_shape"][1:3] == [H, W] or facts["input_shape"][2:] == [H, W], facts
    runner = get("litert").load(tmp_path / "engine", tiny.build_engine)
    x = DetectionSet(tiny_manifest, "test", (W, H)).batch(slice(0, 4))
    assert _same_detections(runner(x), _eager(adapter, model, tiny)(x), atol=0.05) > 0


def test_an_imported_onnx_with_a_fixed_rectangular_input_reads_its_size(rect, tiny, tmp_path):
    adapter, model, tmp, _ = rect
    n = adapter.num_classes(model)
    found = oi.inspect(tmp / "model.onnx", "detections", n)
    assert found.input_size == (W, H)
    assert oi.inspect(tmp / "model.onnx", "detections", n, (W, H)).input_size == (W, H)
    with pytest.raises(DataError, match=r"\[96, 64\] but the pipeline's train.input_size is "
                       r"\[64, 96\]; set train.input_size: \[96, 64\]"):  # fmt: skip
        oi.inspect(tmp / "model.onnx", "detections", n, (H, W))
    imported = adapter_for(
        tiny.model.model_copy(update={"family": "onnx", "onnx": str(tmp / "model.onnx")})
    )
    assert imported.input_size() == (W, H)
    assert oi.macs_and_params(tmp / "model.onnx")[0] > 0


def test_tensorrt_profile_carries_height_then_width(tiny, tmp_path):
    line = trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", tiny.build_engine, False,
                           (3, H, W))  # fmt: skip
    lo, opt, hi = tiny.build_engine.tensorrt_batch
    assert f"--minShapes=images:{lo}x3x{H}x{W}" in line
    assert f"--maxShapes=images:{hi}x3x{H}x{W}" in line


@pytest.mark.parametrize("image_wh", [(200, 60), (50, 120)])
def test_a_box_on_a_non_square_image_comes_back_through_a_rectangular_input(tmp_path, image_wh):
    """Image -> [96, 64] letterbox -> the model's input pixels -> back: the same pixels, for a
    wide image (bars above and below) and a tall one (bars left and right)."""
    iw, ih = image_wh
    box = (10, 12, 30, 20) if iw > ih else (8, 50, 30, 40)  # x, y, w, h in image pixels
    rgb = np.zeros((ih, iw, 3), np.uint8)
    x, y, bw, bh = box
    rgb[y : y + bh, x : x + bw] = 255
    Image.fromarray(rgb).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": iw, "height": ih}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(box),
                         "area": bw * bh, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "box"}],
    }  # fmt: skip
    ds = DetectionSet({"root": str(tmp_path), "splits": {"test": coco}}, "test", (W, H))
    assert ds.images.shape == (1, H, W, 3)
    lb = ds.letterboxes[0]
    assert (lb.pad_y > 0) if iw / ih > W / H else (lb.pad_x > 0)
    ys, xs = np.nonzero(ds.images[0, ..., 0] > 127)
    seen = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    assert np.allclose(seen, ds.boxes[0], atol=1.0)  # the label is where its pixels went

    def runner(batch):  # a detector that finds exactly the pixels it sees, in (N, 3, H, W)
        assert batch.shape[2:] == (H, W)
        return np.array([1]), seen[None], np.ones((1, 1)), np.zeros((1, 1))

    (row,) = predict(runner, ds)
    assert np.allclose(row["bbox"], box, atol=1 / min(lb.sx, lb.sy)), (row["bbox"], box)


@pytest.mark.slow  # ~25 s on the loaded 2-core machine (yolov8n's dynamo export)
def test_yolo_builds_trains_and_deploys_at_a_rectangle(tiny, tmp_path):
    """Ultralytics takes any multiple of 32 per side: yolov8n at [96, 64] has 12x8 + 6x4 + 3x2
    anchors, a finite loss whose targets are normalised by (w, h, w, h), and a deployable graph
    whose ONNX (N, 3, 64, 96) matches PyTorch with boxes inside the wide input."""
    pytest.importorskip("ultralytics")
    from tasks.models.config import ModelCfg
    from tasks.models.onnx_export import parity, to_onnx

    yw, yh = 96, 64
    adapter = adapter_for(ModelCfg(family="yolo"))
    assert adapter.input_stride == ModelCfg(family="yolo").input_stride == 32
    model = adapter.build(3, (yw, yh), seed=0)
    assert adapter.input_size(model) == (yw, yh)
    x = torch.rand(2, 3, yh, yw)
    raw = adapter.forward_train(model, x)
    assert raw["scores"].shape == (2, 3, 12 * 8 + 6 * 4 + 3 * 2)
    boxes = [np.array([[60.0, 8.0, 92.0, 40.0]], np.float32)] * 2  # right part: x > h
    loss = adapter.loss(model, raw, boxes, [np.array([1])] * 2)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    model.eval()
    adapter.save(tmp_path / "y.pt", model, [{"id": i, "name": str(i)} for i in range(3)], {})
    again = adapter.load(torch.load(tmp_path / "y.pt", weights_only=True), tmp_path / "y.pt")
    assert adapter.input_size(again) == (yw, yh)
    facts = to_onnx(adapter, model, tiny.export, tmp_path / "y.onnx")
    dims = onnx.load(str(tmp_path / "y.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, yh, yw] and facts["nodes"] > 0
    images = np.random.default_rng(0).random((2, 3, yh, yw), dtype=np.float32)
    same = parity(adapter, model, tmp_path / "y.onnx", images, tiny.export)
    assert same["parity_max_abs_diff"] <= 1e-3, same
    with torch.inference_mode():
        _, b, _, _ = adapter.deployable(model, 100, 0.0)(torch.from_numpy(images))
    assert b[..., 0::2].max() <= yw and b[..., 1::2].max() <= yh and b.max() > yh
