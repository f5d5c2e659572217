"""The decode appended to an imported detector's raw (B, 4 + C, N) predictions: boxes to
x1y1x2y2, class-aware ONNX `NonMaxSuppression`, the K best per image, zero padding, ending in the
project's `OUTPUTS`. Every node and constant is named `decode/...`; the model records where the
detector ends in `metadata_props` (`DETECTOR_END`), so INT8 can leave the decode in float and the
LiteRT target can cut the graph there.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tasks.models.onnx_graph import DECODE_PREFIX

__all__ = ["DECODE_PREFIX", "DETECTOR_END", "append_decode", "decode_nodes", "detector_end",
           "integral_convs"]  # fmt: skip

DETECTOR_END = "shrinkflow.detector_end"  # metadata key: the tensor where the detector ends


class _Decode:
    """Builds the `decode/` nodes and initializers (every name gets the prefix)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.weights.append(numpy_helper.from_array(np.asarray(value), DECODE_PREFIX + name))
        return DECODE_PREFIX + name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs):
        outs = [f"{DECODE_PREFIX}{name}" + (f":{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=DECODE_PREFIX + name, **attrs)
        )
        return outs[0] if outputs == 1 else outs


def append_decode(
    model: onnx.ModelProto,
    raw: str,
    num_classes: int,
    max_detections: int,
    score_floor: float,
    iou_threshold: float,
    batch,
) -> None:
    """Append decode + NMS reading `raw` (B, 4 + C, N) and make `OUTPUTS` the graph's outputs.

    Shapes: M = the boxes NMS keeps over the whole batch (at most K per image and class), K =
    max_detections. Each image's K best are taken by TopK over a (B, M + K) matrix holding the
    image's own kept scores and -1 elsewhere; the K extra columns are -1 padding, so TopK always
    has K candidates. Rows whose score is the -1 filler are zeroed and not counted.
    """
    k, c = max_detections, num_classes
    d = _Decode()
    ax1, ax2 = d.const("axis1", [1]), d.const("axis2", [2])
    t = d.op("Transpose", [raw], "bnc", perm=[0, 2, 1])  # (B, N, 4 + C)
    xy = d.op("Slice", [t, d.const("0", [0]), d.const("2", [2]), ax2], "xy")  # (B, N, 2)
    wh = d.op("Slice", [t, d.const("2b", [2]), d.const("4", [4]), ax2], "wh")
    half = d.op("Mul", [wh, d.const("half", np.float32(0.5))], "half_wh")
    boxes = d.op(
        "Concat",
        [d.op("Sub", [xy, half], "x1y1"), d.op("Add", [xy, half], "x2y2")],
        "boxes_xyxy",
        axis=2,
    )  # (B, N, 4)
    scores = d.op("Slice", [raw, d.const("4c", [4]), d.const("end", [4 + c]), ax1], "class_scores")
    selected = d.op(
        "NonMaxSuppression",
        [
            boxes,
            scores,  # (B, C, N): per class, so NMS is class-aware
            d.const("max_per_class", np.array([k], np.int64)),
            d.const("iou_threshold", np.array([iou_threshold], np.float32)),
            d.const("score_threshold", np.array([score_floor], np.float32)),
        ],
        "nms",
        center_point_box=0,
    )  # (M, 3) int64: batch, class, box
    image = d.op("Gather", [selected, d.const("i0", np.int64(0))], "sel_image", axis=1)  # (M,)
    cls = d.op("Gather", [selected, d.const("i1", np.int64(1))], "sel_class", axis=1)
    image_box = d.op("Gather", [selected, d.const("i02", [0, 2])], "sel_image_box", axis=1)
    sel_scores = d.op("GatherND", [scores, selected], "sel_scores")  # (M,)
    sel_boxes = d.op("GatherND", [boxes, image_box], "sel_boxes")  # (M, 4)
    n = d.op("Gather", [d.op("Shape", [raw], "shape"), d.const("i0b", np.int64(0))], "batch")
    rows = d.op(
        "Unsqueeze",
        [d.op("Range", [d.const("r0", np.int64(0)), n, d.const("r1", np.int64(1))], "range"), ax1],
        "rows",
    )  # (B, 1)
    mine = d.op("Equal", [d.op("Unsqueeze", [image, d.const("ax0", [0])], "cols"), rows], "mine")
    filler = d.const("filler", np.float32(-1.0))
    masked = d.op(
        "Where",
        [mine, d.op("Unsqueeze", [sel_scores, d.const("ax0b", [0])], "sel_scores_row"), filler],
        "masked",
    )  # (B, M)
    pad_shape = d.op(
        "Concat",
        [d.op("Unsqueeze", [n, d.const("ax0c", [0])], "batch_1d"), d.const("k", [k])],
        "pad_shape",
        axis=0,
    )
    pad = d.op(
        "ConstantOfShape",
        [pad_shape],
        "pad",
        value=numpy_helper.from_array(np.array([-1.0], np.float32)),
    )  # (B, K)
    candidates = d.op("Concat", [masked, pad], "candidates", axis=1)  # (B, M + K)
    top, index = d.op(
        "TopK",
        [candidates, d.const("topk", np.array([k], np.int64))],
        "topk",
        outputs=2,
        axis=1,
        largest=1,
        sorted=1,
    )  # (B, K) each
    valid = d.op("Greater", [top, d.const("half_filler", np.float32(-0.5))], "valid")
    box_pool = d.op(
        "Concat",
        [sel_boxes, d.const("zero_boxes", np.zeros((k, 4), np.float32))],
        "box_pool",
        axis=0,
    )  # (M + K, 4)
    cls_pool = d.op(
        "Concat",
        [
            d.op("Cast", [cls], "sel_class_i32", to=TensorProto.INT32),
            d.const("zero_classes", np.zeros(k, np.int32)),
        ],
        "class_pool",
        axis=0,
    )  # (M + K,)
    zero_f, zero_i = d.const("zero_f", np.float32(0.0)), d.const("zero_i", np.int32(0))
    valid3 = d.op("Unsqueeze", [valid, ax2], "valid3")
    d.nodes += [
        helper.make_node(
            "ReduceSum",
            [d.op("Cast", [valid], "valid_i32", to=TensorProto.INT32), ax1],
            ["num_detections"],
            name=DECODE_PREFIX + "num_detections",
            keepdims=0,
        ),
        helper.make_node(
            "Where",
            [valid3, d.op("Gather", [box_pool, index], "top_boxes", axis=0), zero_f],
            ["boxes"],
            name=DECODE_PREFIX + "boxes",
        ),
        helper.make_node("Where", [valid, top, zero_f], ["scores"], name=DECODE_PREFIX + "scores"),
        helper.make_node(
            "Where",
            [valid, d.op("Gather", [cls_pool, index], "top_classes", axis=0), zero_i],
            ["classes"],
            name=DECODE_PREFIX + "classes",
        ),
    ]
    model.graph.node.extend(d.nodes)
    model.graph.initializer.extend(d.weights)
    del model.graph.output[:]
    model.graph.output.extend([
        helper.make_tensor_value_info("num_detections", TensorProto.INT32, [batch]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, k, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, k]),
        helper.make_tensor_value_info("classes", TensorProto.INT32, [batch, k]),
    ])  # fmt: skip


def decode_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the appended decode's nodes (to exclude from quantization: NNCF's
    `IgnoredScope(patterns=["decode/.*"])` or ORT's `nodes_to_exclude`)."""
    return [n.name for n in model.graph.node if n.name.startswith(DECODE_PREFIX)]


def integral_convs(model: onnx.ModelProto) -> list[str]:
    """Conv nodes that compute a fixed expectation rather than learned features: a 1x1 conv
    with weights exactly 0, 1, ..., n-1 (Ultralytics' DFL box integral, inside the imported
    graph). INT8 would round those bin centres (per-channel scale (n-1)/127), so the quantize
    stage should pass them to `nodes_to_exclude` (ORT) / an IgnoredScope (NNCF)."""
    weights = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "Conv" else None
        if w is None or len(w.dims) != 4 or w.dims[0] != 1 or list(w.dims[2:]) != [1, 1]:
            continue
        if np.array_equal(numpy_helper.to_array(w).ravel(), np.arange(w.dims[1])):
            found.append(node.name)
    return found


def detector_end(model: onnx.ModelProto) -> str | None:
    """The tensor where the imported detector ends and the appended decode begins, if any."""
    return next((p.value for p in model.metadata_props if p.key == DETECTOR_END), None)
