"""NNCF's INT8 of an FP32 ONNX on OpenVINO: what a user gets without Shrinkflow, as reference
rows beside the project's own quantizer (variants; quantize's `method: nncf | best`).

Two models from the same FP32 ONNX and the same calibration images as the quantize stage
(`tasks.quantization.qdq.calibration_set`: same seed and count):

- `ptq`: `nncf.quantize`, NNCF's default post-training quantization (min/max ranges, fast bias
  correction, performance preset) for the CPU.
- `accuracy_control`: `nncf.quantize_with_accuracy_control` with `max_drop` =
  `quantize.max_map_drop` (absolute), validated with the project's own val mAP@0.5
  (`tasks.metrics.detection`): NNCF ranks the quantized operations by their effect on the metric and
  reverts the worst to float until the drop is within the bound (or reports that it is not).

The graph's own decode (sigmoid, peak pooling, top-K, NMS, box arithmetic) is left out of
quantization with an `IgnoredScope` naming every operation below the last convolutions, and so
are integral convs (a box distribution's fixed bin centres): the same split the ONNX Runtime
quantizer makes (tasks/quantization/qdq.py). NNCF's default would also quantize the decode's
elementwise
arithmetic (box offsets times stride, for instance), which moves boxes by a quantization step.
Both runs are deterministic: the calibration images are fixed, `subset_size` is their count,
and ranking runs in one worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import QuantizeCfg
from tasks.metrics.detection import coco_map, to_rows
from tasks.models.onnx_decode import integral_convs

log = logging.getLogger(__name__)
PEERS = ("nncf_ptq", "nncf_accuracy_control")  # the rows they make in variants
CONVS = ("Convolution", "GroupConvolution")


def unavailable() -> str | None:
    """Why NNCF's peers cannot be made here (None: they can)."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        return f"nncf not installed ({e.name})"
    return None


def _quiet() -> None:
    import nncf

    nncf.set_log_level(logging.WARNING)


def decode_scope(model, src: Path):
    """An `nncf.IgnoredScope` naming the OpenVINO operations of `model` that must stay float:
    every operation with no (non-integral) convolution below it, i.e. the graph's decode, and
    the integral convs of `src` (the ONNX it was converted from). None when there are none."""
    import nncf

    graph = onnx.load(str(src))
    integral = set()
    for node in graph.graph.node:
        if node.name in set(integral_convs(graph)):
            integral |= {node.name, *node.output}
    ops = model.get_ordered_ops()
    is_conv = {
        op.get_friendly_name(): op.get_type_name() in CONVS
        and op.get_friendly_name() not in integral
        for op in ops
    }
    conv_below: dict[str, bool] = {}
    for op in reversed(ops):
        children = [
            target.get_node() for output in op.outputs() for target in output.get_target_inputs()
        ]
        conv_below[op.get_friendly_name()] = any(
            is_conv[c.get_friendly_name()] or conv_below[c.get_friendly_name()] for c in children
        )
    names = [
        op.get_friendly_name()
        for op in ops
        if op.get_type_name() not in ("Parameter", "Result", "Constant")
        and not is_conv[op.get_friendly_name()]
        and (not conv_below[op.get_friendly_name()] or op.get_friendly_name() in integral)
    ]
    return nncf.IgnoredScope(names=names, validate=False) if names else None


def _calibration(images: np.ndarray):
    import nncf

    return nncf.Dataset(list(images), lambda x: x[None])


def _validation(val: DetectionSet):
    import nncf

    return nncf.Dataset(list(range(len(val))), lambda i: val.batch(slice(i, i + 1)))


def subset_map(compiled, val: DetectionSet, indices: Iterable[int], batch_size: int = 32) -> float:
    """Val mAP@0.5 (tasks.metrics.detection) of an OpenVINO compiled model on the val images
    `indices`."""

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = compiled(x)
        return [result[o] for o in compiled.outputs]

    return runner_map(run, val, indices, batch_size)


def runner_map(run, val: DetectionSet, indices: Iterable[int], batch_size: int = 32) -> float:
    """Val mAP@0.5 (tasks.metrics.detection) of `run` (batch -> outputs) on the val images
    `indices`."""
    idx = list(indices)
    rows: list[dict] = []
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        outputs = run(val.batch(np.asarray(part)))
        rows += to_rows(
            outputs,
            [val.ids[i] for i in part],
            [val.letterboxes[i] for i in part],
            val.categories,
        )
    ids = {val.ids[i] for i in idx}
    gt = {
        "images": [im for im in val.coco["images"] if im["id"] in ids],
        "annotations": [a for a in val.coco["annotations"] if a["image_id"] in ids],
        "categories": val.coco["categories"],
    }
    return coco_map(gt, rows)["map50"]


def _compiled(model, threads: int):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    return ov.Core().compile_model(model, "CPU", config)


def fake_quantize_count(model) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def quantized_convs(model) -> tuple[int, int]:
    """(convolutions fed by a FakeQuantize on their activations, all convolutions)."""
    convs = [op for op in model.get_ops() if op.get_type_name() in CONVS]
    fed = 0
    for op in convs:
        source = op.input_value(0).get_node()
        fed += source.get_type_name() == "FakeQuantize"
    return fed, len(convs)


def peers(
    src: Path,
    images: np.ndarray,
    val: DetectionSet,
    cfg: QuantizeCfg,
    threads: int,
    which: Iterable[str] = PEERS,
) -> dict[str, tuple[object, dict]]:
    """{peer: (OpenVINO model, facts)} for the peers named in `which` (see PEERS), made from
    the FP32 ONNX `src` with the calibration `images`. Facts: val mAP@0.5 of the FP32 model and
    of the peer (same evaluator), the drop, FakeQuantize and quantized-conv counts, and for
    accuracy control whether the drop met `max_map_drop`."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    _quiet()
    fp32 = ov.convert_model(str(src))
    scope = decode_scope(fp32, src)
    everything = range(len(val))
    fp32_map = subset_map(_compiled(fp32, threads), val, everything)
    common = {
        "subset_size": len(images),
        "target_device": nncf.TargetDevice.CPU,
        "ignored_scope": scope,
    }
    made: dict[str, tuple[object, dict]] = {}
    for name in which:
        if name == "nncf_ptq":
            model = nncf.quantize(fp32.clone(), _calibration(images), **common)
            how = "nncf.quantize (default PTQ, CPU)"
        elif name == "nncf_accuracy_control":

            def validate(compiled, items) -> tuple[float, None]:
                return subset_map(compiled, val, items), None

            model = nncf.quantize_with_accuracy_control(
                fp32.clone(),
                _calibration(images),
                _validation(val),
                validate,
                max_drop=cfg.max_map_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    num_ranking_workers=1
                ),
                **common,
            )
            how = f"nncf.quantize_with_accuracy_control (max_drop {cfg.max_map_drop}, absolute)"
        else:
            raise ValueError(f"unknown NNCF peer {name!r}: expected one of {PEERS}")
        peer_map = subset_map(_compiled(model, threads), val, everything)
        fed, convs = quantized_convs(model)
        facts = {
            "made_by": how,
            "val_map50_fp32": fp32_map,
            "val_map50": peer_map,
            "val_map50_drop": fp32_map - peer_map,
            "fake_quantize": fake_quantize_count(model),
            "convs_int8": fed,
            "convs": convs,
            "ignored_ops": len(scope.names) if scope else 0,
        }
        if name == "nncf_accuracy_control":
            facts["drop_met"] = fp32_map - peer_map <= cfg.max_map_drop + 1e-9
        made[name] = (model, facts)
        log.info("%s: val mAP@0.5 %.4f (fp32 %.4f), %d/%d convs INT8", name, peer_map,
                 fp32_map, fed, convs)  # fmt: skip
    return made


def save(model, folder: Path, xml: str = "model.xml") -> Path:
    """Write `model` as OpenVINO IR (float weights stay float32) into `folder`."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(folder / xml), compress_to_fp16=False)
    return folder / xml


# NNCF's ONNX backend: the same quantization as a QDQ ONNX (quantize's `method: nncf | best`).
# Every QDQ engine target builds it (ONNX Runtime, OpenVINO), unlike the OpenVINO IR above.
# Its activations are uint8 (zero point 0 after ReLU), which TensorRT's explicit quantization
# does not take; LiteRT takes no QDQ model at all.


def onnx_decode_scope(model: onnx.ModelProto):
    """`decode_scope` on the ONNX graph itself: an `nncf.IgnoredScope` naming every node with
    no (non-integral) convolution below it, and the integral convs. None when there are none."""
    import nncf

    fixed = set(integral_convs(model))
    convs = {n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in fixed}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    conv_below: dict[str, bool] = {}
    for node in reversed(model.graph.node):  # ONNX nodes are topologically sorted
        conv_below[node.name] = any(
            c.name in convs or conv_below.get(c.name, False)
            for out in node.output
            for c in consumers.get(out, [])
        )
    names = [
        n.name
        for n in model.graph.node
        if n.name not in convs and (not conv_below[n.name] or n.name in fixed)
    ]
    return nncf.IgnoredScope(names=names, validate=False) if names else None


def _ort_run(model: onnx.ModelProto | bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def onnx_int8(
    src: Path, images: np.ndarray, val: DetectionSet, cfg: QuantizeCfg, threads: int, dst: Path
) -> dict:
    """NNCF's INT8 of the FP32 ONNX `src` as a QDQ ONNX at `dst`, by NNCF's ONNX backend:
    `nncf.quantize`, then, when `quantize.accuracy_aware` and it loses more than
    `quantize.max_map_drop`, `nncf.quantize_with_accuracy_control` (that max drop, absolute,
    the project's val mAP@0.5 on ONNX Runtime); CPU target, the decode ignored
    (`onnx_decode_scope`), `images` as calibration. Returns its facts: how it was made, val
    mAP@0.5 of FP32 and INT8 (ONNX Runtime), QDQ counts."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    _quiet()
    fp32 = onnx.load(str(src))
    name = fp32.graph.input[0].name
    scope = onnx_decode_scope(fp32)
    calibration = nncf.Dataset(list(images), lambda x: {name: x[None]})
    common = {
        "subset_size": len(images),
        "target_device": nncf.TargetDevice.CPU,
        "ignored_scope": scope,
    }
    everything = range(len(val))
    fp32_map = runner_map(_ort_run(fp32, threads), val, everything)
    model = nncf.quantize(fp32, calibration, **common)
    int8_map = runner_map(_ort_run(model, threads), val, everything)
    how = "NNCF ONNX backend, nncf.quantize (default PTQ, CPU)"
    if cfg.accuracy_aware and fp32_map - int8_map > cfg.max_map_drop:
        # accuracy control starts from this same PTQ and returns it when it is within the
        # drop: run only when there is something to revert (its ranking validates image by
        # image, minutes on a detector's val split)
        sessions: list = []  # (serialized model, runner) of the last model validated

        def validate(model: onnx.ModelProto, items) -> tuple[float, None]:
            data = model.SerializeToString()  # one session per distinct model
            if not sessions or sessions[0][0] != data:
                sessions[:] = [(data, _ort_run(data, threads))]
            return runner_map(sessions[0][1], val, items), None

        model = nncf.quantize_with_accuracy_control(
            onnx.load(str(src)),  # a fresh copy: the PTQ run may have touched `fp32`
            calibration,
            nncf.Dataset(list(everything), lambda i: {name: val.batch(slice(i, i + 1))}),
            validate,
            max_drop=cfg.max_map_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                num_ranking_workers=1
            ),
            **common,
        )
        int8_map = runner_map(_ort_run(model, threads), val, everything)
        how = (
            "NNCF ONNX backend, nncf.quantize_with_accuracy_control "
            f"(max_drop {cfg.max_map_drop}, absolute)"
        )
    elif cfg.accuracy_aware:
        how += f", within max_drop {cfg.max_map_drop}: accuracy control keeps it as is"
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    ops = [n.op_type for n in model.graph.node]
    quantized = [n for n in model.graph.node if n.op_type == "Conv"]
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    fed = sum(produced.get(n.input[0]) == "DequantizeLinear" for n in quantized)
    facts = {
        "made_by": how,
        "val_map50_fp32": fp32_map,
        "val_map50": int8_map,
        "val_map50_drop": fp32_map - int8_map,
        "quantize_linear": ops.count("QuantizeLinear"),
        "convs_int8": fed,
        "convs": len(quantized),
        "ignored_ops": len(scope.names) if scope else 0,
    }
    log.info("NNCF ONNX INT8: val mAP@0.5 %.4f (fp32 %.4f), %d/%d convs INT8", int8_map,
             fp32_map, fed, len(quantized))  # fmt: skip
    return facts
