"""NNCF's peers on OpenVINO (tasks/quantization/nncf_peers.py) on the shared tiny model: PTQ really
runs its
convolutions in INT8 with the decode left float, accuracy control keeps val mAP@0.5 within
`quantize.max_map_drop`, and without NNCF the rows say so. The rows in a real variants table:
tests/test_pipeline.py."""

import sys

import openvino as ov
import pytest

from tasks import quantize, variants
from tasks.datasets.coco import DetectionSet
from tasks.engines.openvino_cpu import conv_precisions
from tasks.metrics.detection import coco_metrics, predict
from tasks.quantization import nncf_peers

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def splits(tiny_manifest):
    return {s: DetectionSet(tiny_manifest, s, 64) for s in ("train", "val")}


@pytest.fixture(scope="module")
def peers(models, splits, tiny, tmp_path_factory):
    """Both peers of the shared tiny model, saved as IR: {name: (xml, facts)}."""
    images, _, _ = quantize.calibration_set(tiny.quantize, splits["train"])
    made = nncf_peers.peers(models / "fp32.onnx", images, splits["val"], tiny.quantize, 1)
    out = tmp_path_factory.mktemp("nncf-peers")
    return {name: (nncf_peers.save(m, out / name), facts) for name, (m, facts) in made.items()}


def compiled(xml):
    return ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def ov_map(xml, dataset) -> float:
    """mAP@0.5 of an IR through the project's own evaluator (predict + coco_metrics)."""
    model = compiled(xml)
    request = model.create_infer_request()

    def run(x):
        result = request.infer({0: x})
        return [result[o] for o in model.outputs]

    return coco_metrics(dataset.coco, predict(run, dataset), 0.3)["map50"]


def test_ptq_runs_every_detector_conv_in_int8_and_leaves_the_decode_float(models, peers):
    xml, facts = peers["nncf_ptq"]
    precisions = conv_precisions(compiled(xml))
    assert set(precisions) <= {"u8", "i8"}, precisions  # no conv left in f32
    assert sum(precisions.values()) == facts["convs"] == facts["convs_int8"] > 0
    fp32 = ov.convert_model(str(models / "fp32.onnx"))
    float_precisions = conv_precisions(compiled(nncf_peers.save(fp32, xml.parent / "fp32")))
    assert set(float_precisions) == {"f32"}  # the check tells INT8 from float
    model = ov.Core().read_model(str(xml))
    scope = nncf_peers.decode_scope(
        ov.convert_model(str(models / "fp32.onnx")), models / "fp32.onnx"
    )
    assert scope is not None and facts["ignored_ops"] == len(scope.names) > 0
    decode = set(scope.names)
    fed_by_fq = [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_friendly_name() in decode
        and any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())
    ]
    assert not fed_by_fq  # the decode (top-K, NMS, box arithmetic) computes in float
    assert facts["fake_quantize"] == nncf_peers.fake_quantize_count(model)


def test_accuracy_control_keeps_val_map_within_the_max_drop(models, peers, splits, tiny):
    xml, facts = peers["nncf_accuracy_control"]
    fp32_xml = nncf_peers.save(ov.convert_model(str(models / "fp32.onnx")), xml.parent / "ref")
    fp32_map, ac_map = ov_map(fp32_xml, splits["val"]), ov_map(xml, splits["val"])
    assert facts["val_map50_fp32"] == pytest.approx(fp32_map, abs=1e-6)
    assert facts["val_map50"] == pytest.approx(ac_map, abs=1e-6)
    assert fp32_map - ac_map <= tiny.quantize.max_map_drop + 1e-9
    assert facts["drop_met"] is True
    assert facts["fake_quantize"] > 0  # still an INT8 model, not everything reverted
    assert facts["made_by"].startswith("nncf.quantize_with_accuracy_control")


def test_subset_map_scores_only_the_images_given(models, splits):
    xml = nncf_peers.save(ov.convert_model(str(models / "fp32.onnx")), models / "subset-ir")
    model, val = compiled(xml), splits["val"]
    whole = nncf_peers.subset_map(model, val, range(len(val)))
    assert whole == pytest.approx(ov_map(xml, val), abs=1e-9)
    one = [i for i in range(len(val)) if val.boxes[i].size][:1]  # an image with objects
    gt = {
        "images": [im for im in val.coco["images"] if im["id"] == val.ids[one[0]]],
        "annotations": [a for a in val.coco["annotations"] if a["image_id"] == val.ids[one[0]]],
        "categories": val.coco["categories"],
    }
    rows = [
        r
        for r in predict(lambda x: list(model(x).values()), val)
        if r["image_id"] == val.ids[one[0]]
    ]
    assert nncf_peers.subset_map(model, val, one) == pytest.approx(
        coco_metrics(gt, rows, 0.3)["map50"], abs=1e-9
    )


def test_variants_without_nncf_marks_its_rows_skipped(monkeypatch, models, splits, tiny):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError
    assert nncf_peers.unavailable() == "nncf not installed (nncf)"
    rows = variants._nncf_peers(tiny.quantize, models / "fp32.onnx", None, splits["val"], 1)
    assert rows == {name: "skipped: nncf not installed" for name in nncf_peers.PEERS}
    table = {
        "nncf_ptq": {"runtime": "openvino (NNCF)", "precision": None, "status": rows["nncf_ptq"]}
    }
    assert "| nncf_ptq | openvino (NNCF) | skipped: nncf not installed |" in variants.render(table)
