"""`quantize.method: ort | nncf | best` (tasks/quantize.py, tasks/quantization/nncf_peers.py)
on the shared tiny model: `nncf` gives a target NNCF's QDQ graph (NNCF's ONNX backend) that
builds and runs INT8 on the target's engine; `best` keeps the candidate with the higher val
mAP@0.5 whichever side it is on (one side deliberately mis-calibrated); NNCF on a target it
cannot serve is a ConfigError naming the field."""

import shutil

import onnx
import pytest

from tasks import build_engine, quantize
from tasks.datasets.coco import DetectionSet
from tasks.harness.errors import ConfigError, GateFailed
from tasks.quantization import method as qmethod
from tasks.quantization import report as qreport
from tasks.quantization import targets as qtargets

pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def splits(tiny_manifest):
    return {s: DetectionSet(tiny_manifest, s, 64) for s in ("train", "val")}


@pytest.fixture(scope="module")
def bad_int8(models, splits, tiny, tmp_path_factory):
    """ONNX Runtime's INT8 of the tiny model calibrated on images 20x too bright: every
    activation range 20x too wide, so the steps are too coarse (a deliberately bad
    calibration; dimmed images cost this ReLU net nothing)."""
    out = tmp_path_factory.mktemp("bad-calibration")
    cfg = tiny.quantize
    images, _, _ = quantize.calibration_set(cfg, splits["train"])
    quantize.calibrate(models / "fp32.onnx", images * 20, cfg, "minmax", out / "ranges.json")
    quantize.to_int8(models / "fp32.onnx", out / "bad.onnx", out / "ranges.json", cfg, "minmax")
    return out / "bad.onnx"


def _inputs(models, splits):
    return {
        "onnx_path": models / "fp32.onnx",
        "train": splits["train"],
        "val": splits["val"],
        "threads": 1,
        "qat_onnx": None,
    }


def _stage_out(tmp_path, deployable, splits, models):
    """A quantize output folder holding `deployable` as model.onnx, and run()'s report facts
    that target_models reads (precision, FP32 val mAP@0.5)."""
    shutil.copy(deployable, tmp_path / "model.onnx")
    fp32 = quantize.val_map(models / "fp32.onnx", splits["val"], 1)
    return {"precision": "int8", "val_map50": {"fp32": fp32}}


def _nncf_named(path) -> int:
    """QuantizeLinear nodes named as NNCF's ONNX backend names them (ONNX Runtime's quantizer
    names them `<tensor>_QuantizeLinear`)."""
    nodes = onnx.load(str(path)).graph.node
    return sum(
        n.op_type == "QuantizeLinear" and n.name.startswith("QuantizeLinear_") for n in nodes
    )


def test_method_nncf_gives_the_target_nncf_qdq_graph_that_builds_int8(
    models, splits, tiny, tmp_path
):
    cfg = tiny.quantize.model_copy(update={"method": {"openvino": "nncf"}})
    report = _stage_out(tmp_path, models / "int8.onnx", splits, models)
    made = qtargets.target_models(
        cfg, ["onnxruntime", "openvino"], report, tmp_path, tiny.build_engine,
        build=quantize.run, **_inputs(models, splits),
    )  # fmt: skip
    ov_model, ort_model = (
        tmp_path / "targets" / t / "model.onnx" for t in ("openvino", "onnxruntime")
    )
    assert ort_model.read_bytes() == (models / "int8.onnx").read_bytes()  # ort: unchanged
    assert _nncf_named(ort_model) == 0
    graph = onnx.load(str(ov_model)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    produced = {o: n.op_type for n in graph.node for o in n.output}
    assert _nncf_named(ov_model) > 0
    assert made["openvino"]["method"] == "nncf" and made["onnxruntime"]["method"] == "ort"
    assert made["nncf"]["convs_int8"] == sum(
        produced[c.input[0]] == "DequantizeLinear" for c in convs
    )
    assert made["nncf"]["convs_int8"] > 0 and made["nncf"]["precision"] == "int8"
    facts = made["nncf"]
    assert facts["made_by"].startswith("NNCF ONNX backend, nncf.quantize")
    if facts["val_map50_drop"] > cfg.max_map_drop:  # only then has accuracy control work
        assert "nncf.quantize_with_accuracy_control" in facts["made_by"]
    assert made["nncf"]["val_map50"] == pytest.approx(quantize.val_map(ov_model, splits["val"], 1))
    built = build_engine.run(
        tiny.build_engine, target="openvino", onnx_path=ov_model, out=tmp_path / "engine"
    )
    assert built["status"] == "ok"
    assert set(built["conv_precisions"]) & {"u8", "i8"}, built["conv_precisions"]


def test_best_keeps_the_higher_val_map_whichever_side_it_is(
    models, splits, tiny, bad_int8, tmp_path
):
    val, good = splits["val"], models / "int8.onnx"
    good_map, bad_map = (quantize.val_map(p, val, 1) for p in (good, bad_int8))
    assert bad_map < good_map - 0.05  # the case is what it claims to be
    fp32 = quantize.val_map(models / "fp32.onnx", val, 1)
    cfg = tiny.quantize.model_copy(update={"keep_faster_rounds": 2, "max_map_drop": 1.0})
    for i, (ort_side, nncf_side, want) in enumerate(
        [(bad_int8, good, "nncf"), (good, bad_int8, "ort")]
    ):
        best = qmethod.pick_best(
            cfg, "onnxruntime", {"ort": ort_side, "nncf": nncf_side}, val, fp32,
            tiny.build_engine, tmp_path / str(i),
        )  # fmt: skip
        assert best["chosen"] == want, best
        assert best["candidates"][want]["val_map50"] == pytest.approx(good_map)
        assert all(c["latency_ms_p50"] > 0 for c in best["candidates"].values())
    # a tie (every difference within best_map_tie) goes to the one measured faster
    tie = qmethod.pick_best(
        cfg.model_copy(update={"best_map_tie": 1.0}), "onnxruntime",
        {"ort": bad_int8, "nncf": good}, val, fp32, tiny.build_engine, tmp_path / "tie",
    )  # fmt: skip
    lat = {k: c["latency_ms_p50"] for k, c in tie["candidates"].items()}
    assert tie["chosen"] == min(lat, key=lat.get) and "faster" in tie["reason"]


def _qdq_on_the_input_only(src, dst) -> None:
    """`src` with one QuantizeLinear -> DequantizeLinear pair on the image input and float
    weights: a QDQ graph of which ONNX Runtime runs no conv in INT8 (as it ran none of NNCF's
    QDQ YOLOv8n, where NNCF leaves the conv outputs feeding SiLU unquantized)."""
    model = onnx.load(str(src))
    graph, name = model.graph, model.graph.input[0].name
    for node in graph.node:
        node.input[:] = [f"{name}_dq" if i == name else i for i in node.input]
    scale = onnx.helper.make_tensor("in_scale", onnx.TensorProto.FLOAT, [], [1 / 255])
    zero = onnx.helper.make_tensor("in_zero", onnx.TensorProto.UINT8, [], [0])
    graph.initializer.extend([scale, zero])
    graph.node.insert(0, onnx.helper.make_node(
        "DequantizeLinear", [f"{name}_q", "in_scale", "in_zero"], [f"{name}_dq"]
    ))  # fmt: skip
    graph.node.insert(0, onnx.helper.make_node(
        "QuantizeLinear", [name, "in_scale", "in_zero"], [f"{name}_q"]
    ))  # fmt: skip
    onnx.save(model, str(dst))


def test_best_leaves_out_a_candidate_the_engine_runs_in_float(models, splits, tiny, tmp_path):
    """The YOLO case found on the default data: ONNX Runtime refuses NNCF's QDQ (no conv INT8,
    GateFailed in the engine's build), so `best` keeps ort and records why instead of failing
    the stage."""
    floaty = tmp_path / "float-qdq.onnx"
    _qdq_on_the_input_only(models / "fp32.onnx", floaty)
    with pytest.raises(GateFailed, match="no convolution executes in INT8"):  # as claimed
        qmethod.on_target("onnxruntime", floaty, tmp_path / "check", tiny.build_engine)
    cfg = tiny.quantize.model_copy(update={"keep_faster_rounds": 2})
    val = splits["val"]
    best = qmethod.pick_best(
        cfg, "onnxruntime", {"ort": models / "int8.onnx", "nncf": floaty}, val,
        quantize.val_map(models / "fp32.onnx", val, 1), tiny.build_engine, tmp_path / "best",
    )  # fmt: skip
    assert best["chosen"] == "ort" and set(best["refused"]) == {"nncf"}, best
    assert "nncf refused by the onnxruntime engine" in best["reason"]
    assert best["candidates"]["ort"]["latency_ms_p50"] > 0
    lines = "\n".join(qreport.render_targets({"onnxruntime": {"best": best}}))
    assert "| onnxruntime | nncf | refused by the engine:" in lines
    with pytest.raises(GateFailed):  # our own model refused is the stage's error, as before
        qmethod.pick_best(
            cfg, "onnxruntime", {"ort": floaty, "nncf": models / "int8.onnx"}, val, 0.9,
            tiny.build_engine, tmp_path / "own",
        )  # fmt: skip


def test_best_in_the_stage_swaps_in_nncf_where_ours_is_worse(
    models, splits, tiny, bad_int8, tmp_path
):
    """The stage's own path: ONNX Runtime's model badly calibrated, NNCF's kept, both
    candidates' figures in the facts; LiteRT cannot take NNCF's model and keeps ort."""
    cfg = tiny.quantize.model_copy(update={"method": "best", "keep_faster_rounds": 2})
    report = _stage_out(tmp_path, bad_int8, splits, models)
    made = qtargets.target_models(
        cfg, ["onnxruntime"], report, tmp_path, tiny.build_engine, build=quantize.run,
        **_inputs(models, splits),
    )  # fmt: skip
    kept = tmp_path / "targets" / "onnxruntime" / "model.onnx"
    assert made["onnxruntime"]["method"] == "nncf", made["onnxruntime"]
    assert _nncf_named(kept) > 0
    cands = made["onnxruntime"]["best"]["candidates"]
    assert cands["nncf"]["val_map50"] > cands["ort"]["val_map50"]
    metrics = qreport.target_metrics(made)
    assert metrics["onnxruntime.method"] == "nncf"
    assert "onnxruntime.best.ort.latency_ms_p50" in metrics
    assert "| onnxruntime | nncf |" in "\n".join(qreport.render_targets(made))
    assert qmethod.target_methods(cfg, ["onnxruntime", "litert"])["litert"] == "best"


@pytest.mark.parametrize(
    ("update", "targets", "says"),
    [
        ({"method": "nncf"}, ["onnxruntime", "litert"], "nncf cannot make litert's model"),
        ({"method": {"tensorrt": "nncf"}}, ["tensorrt"], "qint8 QDQ activations"),
        ({"method": {"openvino": "nncf"}}, ["onnxruntime"], "names openvino"),
        ({"method": "best", "precision": "fp16"}, ["openvino"], "quantize.precision is fp16"),
        ({"method": "nncf", "activation_type": "qint8"}, ["openvino"], "qint8 QDQ"),
    ],
)
def test_a_method_nncf_cannot_serve_is_a_config_error(tiny, update, targets, says):
    cfg = tiny.quantize.model_copy(update=update)
    with pytest.raises(ConfigError, match="^params.yaml: quantize.method: ") as e:
        qmethod.target_methods(cfg, targets)
    assert says in str(e.value)


def test_an_unknown_method_is_rejected_by_the_schema(tiny):
    from pydantic import ValidationError

    from tasks.harness.config import QuantizeCfg

    with pytest.raises(ValidationError, match="method"):
        QuantizeCfg.model_validate({**tiny.quantize.model_dump(), "method": "tensorrt"})
    assert QuantizeCfg.model_validate({"method": {"openvino": "best"}}).method == {
        "openvino": "best"
    }
