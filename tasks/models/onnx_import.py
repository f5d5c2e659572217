"""Model family `onnx`: a detector trained anywhere, imported as an ONNX file.

The file (`model.onnx`) enters the pipeline at `quantize`; the stages that need PyTorch (train,
prune, distill, QAT) have no model to work on and report `skipped: imported ONNX`. Its outputs
follow a declared convention (`model.outputs`):

- `detections`: the project's signature already (`OUTPUTS`: num_detections (B,) int32, boxes
  (B, K, 4) xyxy input pixels, scores (B, K) descending, classes (B, K) int32); checked, kept.
- `yolo_raw`: Ultralytics-style raw predictions (B, 4 + C, N): cx, cy, w, h in input pixels, then
  C class scores (already through the sigmoid). `to_detections` appends the decode: boxes to
  x1y1x2y2, class-aware ONNX `NonMaxSuppression`, the K best per image, padding with zeros.

Every appended node and tensor is named `decode/...` and the model records where the detector
ends (`metadata_props`: `shrinkflow.detector_end` = the raw tensor), so INT8 quantization can
leave the decode in float and the LiteRT target can cut the graph there.

MACs are counted from the graph (`macs_and_params`): Conv, ConvTranspose, Gemm and MatMul at the
model's input size for batch 1, with shapes from ONNX shape inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tasks.errors import ConfigError, DataError
from tasks.models.base import OUTPUTS
from tasks.models.config import ModelCfg

log = logging.getLogger(__name__)

CONVENTIONS = ("detections", "yolo_raw")
INPUT_NAME = "images"  # what every runner feeds (tasks/engines, tasks/quantize.py)
DECODE_PREFIX = "decode/"
DETECTOR_END = "shrinkflow.detector_end"  # metadata key: the tensor where the detector ends
MIN_OPSET = 13  # ReduceSum with axes as an input; NonMaxSuppression needs 10
SKIPPED = "skipped: imported ONNX"  # what the PyTorch stages report for this family
EXPECTED_DETECTIONS = (
    "num_detections (B,) int32, boxes (B,K,4) float, scores (B,K) float, classes (B,K) int32"
)
EXPECTED_RAW = "one output (B, 4+C, N) float: cx, cy, w, h, then C class scores"


@dataclass(frozen=True)
class Imported:
    """What `inspect` found in an imported ONNX.

    `input_size`: the square side S (static in the file, or the declared one);
    `raw_output`: for `yolo_raw`, the (B, 4 + C, N) tensor's name; `anchors`: its N.
    """

    path: Path
    convention: str
    input_name: str
    input_size: int
    dynamic_batch: bool
    num_classes: int
    outputs: dict[str, list]  # name -> shape (ints, or dim names for symbolic axes)
    raw_output: str | None = None
    anchors: int | None = None
    opset: int = 0


# -- inspection -----------------------------------------------------------------------------


def _dims(value_info: onnx.ValueInfoProto) -> list:
    """A value's shape: ints for static axes, the dim name (or '?') for symbolic ones."""
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    return helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name


def _describe(values) -> str:
    return (
        ", ".join(f"{v.name} ({','.join(str(d) for d in _dims(v))}) {_dtype(v)}" for v in values)
        or "none"
    )


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old exporters also list the initializers as graph inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def _load(path: Path) -> onnx.ModelProto:
    from tasks.io import check_onnx

    check_onnx(path)
    return onnx.load(str(path))


def _fixed_size(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """A copy whose image input is (B, 3, size, size) (batch kept as it is), re-inferred."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = _graph_inputs(model)[0].type.tensor_type.shape.dim
    for axis in (2, 3):
        dims[axis].ClearField("dim_param")
        dims[axis].dim_value = size
    del model.graph.value_info[:]
    declared = {}
    for out in model.graph.output:  # symbolic output axes are re-derived below
        declared[out.name] = onnx.ValueInfoProto.FromString(out.SerializeToString())
        out.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for out in model.graph.output:  # what inference could not derive stays as declared
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(declared[out.name])
    return model


def _run_shapes(model: onnx.ModelProto, size: int, path: Path) -> dict[str, list[int]]:
    """Output shapes from one ONNX Runtime run on a (1, 3, S, S) zero image (for graphs whose
    output shapes static inference cannot resolve, e.g. reshapes computed from Shape ops)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    x = np.zeros((1, 3, size, size), np.float32)
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as e:  # noqa: BLE001  (ORT raises its own Fail/InvalidArgument types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{path}: does not run in ONNX Runtime on a (1,3,{size},{size}) image: {first}"
        ) from e
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def _tensor_shapes(
    model: onnx.ModelProto, size: int, names: list[str], path: Path
) -> dict[str, list[int]]:
    """Shapes of intermediate tensors `names` from one ONNX Runtime run (batch 1)."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    graph_outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in graph_outputs
    )
    return _run_shapes(probe, size, path)


def inspect(
    path: Path,
    outputs_convention: str,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> Imported:
    """Load and check an imported ONNX against its declared output convention.

    Args:
        path: the ONNX file (`model.onnx`).
        outputs_convention: `detections` or `yolo_raw` (`model.outputs`).
        num_classes: the dataset's class count; a model with another count is an error.
        input_size: the square input side, required when the file's height/width are symbolic;
            when both are known they must agree.

    Returns:
        Imported: the input's name and size, the output shapes found, the class count.

    Raises:
        ConfigError: unknown convention.
        DataError: not a valid ONNX; not one (B, 3, S, S) float image input; outputs not the
            declared convention (the message lists the names and shapes found and expected);
            a class count different from the dataset's.
    """
    return _inspect(_load(Path(path)), Path(path), outputs_convention, num_classes, input_size)


def _inspect(
    model: onnx.ModelProto,
    path: Path,
    outputs_convention: str,
    num_classes: int | None,
    input_size: int | None,
) -> Imported:
    """`inspect` on a loaded model; `path` names it in errors."""
    if outputs_convention not in CONVENTIONS:
        raise ConfigError(
            f"params.yaml: model.outputs: unknown convention {outputs_convention!r}; choose "
            f"one of {', '.join(CONVENTIONS)}"
        )
    opset = _opset(model)
    inputs = _graph_inputs(model)
    found_in = _describe(inputs)
    dims = _dims(inputs[0]) if len(inputs) == 1 else []
    if (
        len(inputs) != 1
        or len(dims) != 4
        or dims[1] != 3
        or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT
    ):
        raise DataError(
            f"{path}: inputs found: {found_in}; expected one image input (B,3,S,S) float32"
        )
    h, w = dims[2], dims[3]
    static = [d for d in (h, w) if isinstance(d, int) and d > 0]
    if len(static) == 2 and h != w:
        raise DataError(f"{path}: input {inputs[0].name} is {h}x{w}; expected a square (B,3,S,S)")
    if static and input_size is not None and static[0] != input_size:
        raise DataError(
            f"{path}: input {inputs[0].name} is {static[0]}x{static[0]} but the pipeline's input "
            f"size is {input_size}; export the model at {input_size} or change the input size"
        )
    size = static[0] if static else input_size
    if size is None:
        raise DataError(
            f"{path}: input {inputs[0].name} has symbolic height/width ({h}, {w}); give the "
            "pipeline's input size (train.input_size)"
        )
    dynamic_batch = not (isinstance(dims[0], int) and dims[0] > 0)
    if not dynamic_batch and dims[0] != 1:
        raise DataError(f"{path}: input {inputs[0].name} has a fixed batch of {dims[0]}; "
                        "expected a dynamic batch axis (or 1)")  # fmt: skip
    sized = _fixed_size(model, size)
    outs = list(sized.graph.output)
    shapes = {o.name: _dims(o) for o in outs}
    if any(not s or any(not isinstance(d, int) or d <= 0 for d in s[1:]) for s in shapes.values()):
        run = _run_shapes(sized, size, path)
        shapes = {n: [s[0], *run[n][1:]] if s else ["?", *run[n][1:]] for n, s in shapes.items()}
    declared = {o.name: _dims(o) for o in model.graph.output}
    for name, dims_found in shapes.items():  # the batch axis as the file names it
        if declared.get(name) and len(declared[name]) == len(dims_found):
            dims_found[0] = declared[name][0]
    found = ", ".join(
        f"{o.name} ({','.join(str(d) for d in shapes[o.name])}) {_dtype(o)}" for o in outs
    )

    def mismatch(expected: str, extra: str = "") -> DataError:
        return DataError(
            f"{path}: outputs do not match model.outputs: {outputs_convention}: found {found}; "
            f"expected {expected}{extra}"
        )

    if outputs_convention == "detections":
        names = [o.name for o in outs]
        types = [o.type.tensor_type.elem_type for o in outs]
        ranks = [len(shapes[n]) for n in names]
        if (
            names != OUTPUTS
            or types != [TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32]
            or ranks != [1, 3, 2, 2]
            or shapes["boxes"][2] != 4
        ):
            hint = "; declare model.outputs: yolo_raw" if len(outs) == 1 and ranks[0] == 3 else ""
            raise mismatch(EXPECTED_DETECTIONS, hint)
        return Imported(path, outputs_convention, inputs[0].name, size, dynamic_batch,
                        num_classes or 0, shapes, opset=opset)  # fmt: skip
    if (
        len(outs) != 1
        or outs[0].type.tensor_type.elem_type != TensorProto.FLOAT
        or len(shapes[outs[0].name]) != 3
        or shapes[outs[0].name][1] <= 4
    ):
        hint = "; declare model.outputs: detections" if [o.name for o in outs] == OUTPUTS else ""
        raise mismatch(EXPECTED_RAW, hint)
    _, channels, anchors = shapes[outs[0].name]
    if anchors == 6 and channels > 6:  # (B, N, 6): x1, y1, x2, y2, score, class
        raise mismatch(EXPECTED_RAW, " ((B, N, 6) is an end-to-end export with NMS inside: "
                       "re-export it without NMS / end2end)")  # fmt: skip
    if channels - 4 > anchors:  # (B, N, 4 + C): the transposed layout
        raise mismatch(EXPECTED_RAW, f" (this looks like (B, N, 4+C) with N={channels})")
    classes = channels - 4
    if num_classes is not None and classes != num_classes:
        raise DataError(
            f"{path}: output {outs[0].name} ({','.join(str(d) for d in shapes[outs[0].name])}) "
            f"holds {classes} class scores; the dataset has {num_classes} classes: expected "
            f"(B,{4 + num_classes},N)"
        )
    return Imported(path, outputs_convention, inputs[0].name, size, dynamic_batch, classes,
                    shapes, raw_output=outs[0].name, anchors=anchors, opset=opset)  # fmt: skip


# -- the appended decode --------------------------------------------------------------------


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename the graph input `old` to `new` everywhere it is read."""
    if old == new:
        return
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


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


def _append_decode(
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


def to_detections(
    model: onnx.ModelProto,
    num_classes: int,
    max_detections: int,
    score_floor: float,
    iou_threshold: float,
    *,
    convention: str = "yolo_raw",
    input_size: int | None = None,
    path: Path | str = "model.onnx",
) -> onnx.ModelProto:
    """The imported model (a copy) ending in the project's `OUTPUTS`, input named `images`
    with height and width fixed to the input size (batch axis kept as it is).

    `yolo_raw`: the (B, 4 + C, N) output gets the `decode/` nodes (see `_append_decode`); the
    graph records `shrinkflow.detector_end` = that tensor. `detections`: checked, passed through.
    Models below opset 13 are converted to opset 13 first. `path` names the file in errors.

    Raises:
        DataError: the model does not match `convention` (see `inspect`), or its opset cannot
            be converted.
    """
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = (str(e).strip().splitlines() or ["invalid"])[0]
        raise DataError(f"{path}: not a valid ONNX model: {first}") from e
    found = _inspect(model, Path(path), convention, num_classes, input_size)
    if found.opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:  # noqa: BLE001  (the converter raises bare RuntimeErrors)
            raise DataError(
                f"{path}: opset {found.opset} could not be converted to {MIN_OPSET} ({e})"
            ) from e
    out = _fixed_size(model, found.input_size)
    _rename_input(out, found.input_name, INPUT_NAME)
    if convention == "detections":
        return out
    raw = found.raw_output
    if raw in OUTPUTS or any(n.name.startswith(DECODE_PREFIX) for n in out.graph.node):
        raise DataError(f"{path}: output {raw!r} or nodes named {DECODE_PREFIX}* clash with the "
                        "appended decode; rename them")  # fmt: skip
    batch = _dims(_graph_inputs(out)[0])[0]
    _append_decode(out, raw, found.num_classes, max_detections, score_floor, iou_threshold,
                   batch if isinstance(batch, int) and batch > 0 else "batch")  # fmt: skip
    out.metadata_props.add(key=DETECTOR_END, value=raw)  # the file's own metadata is kept
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    return out


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


# -- MACs from the graph --------------------------------------------------------------------

_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def macs_and_params(
    model: onnx.ModelProto | Path | str, input_size: int | None = None
) -> tuple[int, int]:
    """MACs for one image and parameter count, read from the ONNX graph.

    Counted ops (shapes from ONNX shape inference at the input size; `input_size` is needed
    only when the file's height/width are symbolic): Conv = OC*OH*OW * KH*KW*IC/groups,
    ConvTranspose = IC*IH*IW * KH*KW*OC/groups, Gemm/MatMul = output elements * the reduced
    dimension; plus one add per output element for a bias, as torch-pruning's counter does.
    Elementwise ops, pooling and resizes are not counted. Parameters: the elements of the
    float initializers, the appended `decode/` constants left out.

    Raises:
        DataError: a counted op whose shapes inference cannot resolve (the file is named).
    """
    path = Path(model) if isinstance(model, (str, Path)) else Path("<model>")
    if isinstance(model, (str, Path)):
        model = _load(path)
    dims = _dims(_graph_inputs(model)[0])
    size = dims[2] if isinstance(dims[2], int) and dims[2] > 0 else input_size
    if size is None:
        raise DataError(f"{path}: symbolic input height/width; give the input size to count MACs")
    model = _fixed_size(model, size)
    graph = model.graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    shapes = {v.name: _dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update(weights)

    counted = [
        n for n in graph.node
        if n.op_type in _WEIGHTED_OPS and not n.name.startswith(DECODE_PREFIX)
    ]  # fmt: skip
    unresolved = [
        name
        for n in counted
        for name in (n.input[0], n.output[0])
        if not shapes.get(name) or any(not isinstance(d, int) or d <= 0 for d in shapes[name][1:])
    ]
    if unresolved:  # e.g. reshapes computed from Shape ops: ask ONNX Runtime, one zero image
        shapes.update(_tensor_shapes(model, size, unresolved, path))

    def shape(name: str, node: onnx.NodeProto) -> list[int]:
        s = shapes.get(name)
        if not s or any(not isinstance(d, int) or d <= 0 for d in s[1:]):
            raise DataError(f"{path}: cannot count MACs: {node.op_type} {node.name!r} tensor "
                            f"{name!r} has shape {s} after shape inference")  # fmt: skip
        return s

    macs = 0
    for node in counted:
        out = shape(node.output[0], node)
        bias = len(node.input) > 2 and bool(node.input[2])
        if node.op_type == "Conv":
            w = shape(node.input[1], node)
            macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x, w = shape(node.input[0], node), shape(node.input[1], node)
            macs += int(np.prod(x[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = shape(node.input[0], node)
            trans_a = any(a_.name == "transA" and a_.i for a_ in node.attribute)
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * a[0 if trans_a else 1]
        else:  # MatMul: (..., M, K) @ (..., K, N)
            a = shape(node.input[0], node)
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * a[-1]
        if bias and node.op_type != "MatMul":
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:]))
    params = sum(
        int(np.prod(t.dims))
        for t in graph.initializer
        if not t.name.startswith(DECODE_PREFIX)
        and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    )
    return macs, params


# -- the family's adapter -------------------------------------------------------------------


class ImportedOnnxAdapter:
    """Family `onnx`: no PyTorch model. The post-training stages take the prepared ONNX
    (`prepare`); `torch_stages` is False and every method that needs a PyTorch model raises
    ConfigError (the stages that need one report `SKIPPED` instead of calling it)."""

    family = "onnx"
    torch_stages = False
    skipped = SKIPPED

    def __init__(self, cfg: ModelCfg) -> None:
        self.cfg = cfg

    def imported_onnx(self) -> Path:
        """The user's file (`model.onnx`)."""
        return Path(self.cfg.onnx)

    def inspect(self, num_classes: int | None = None, input_size: int | None = None) -> Imported:
        return inspect(self.imported_onnx(), self.cfg.outputs, num_classes, input_size)

    def prepare(self, dst: Path, *, num_classes: int, input_size: int, max_detections: int,
                score_floor: float) -> dict:  # fmt: skip
        """See `prepare`."""
        return prepare(self.cfg, dst, num_classes=num_classes, input_size=input_size,
                       max_detections=max_detections, score_floor=score_floor)  # fmt: skip

    def _no_torch(self, what: str):
        raise ConfigError(
            f"params.yaml: model.family: onnx: {what} needs a PyTorch model; an imported ONNX "
            f"({self.cfg.onnx}) enters the pipeline at quantize"
        )

    def build(self, num_classes, input_size, seed):
        self._no_torch("build")

    def save(self, path, model, categories, extra):
        self._no_torch("save")

    def load(self, ckpt, path):
        self._no_torch("load")

    def input_size(self, model=None) -> int:
        """The imported file's square input side (ConfigError when it is symbolic)."""
        found = _dims(_graph_inputs(_load(self.imported_onnx()))[0])
        if isinstance(found[2], int) and found[2] > 0:
            return found[2]
        raise ConfigError(f"params.yaml: model.onnx: {self.cfg.onnx} has a symbolic input size; "
                          "the pipeline's train.input_size is used")  # fmt: skip

    def num_classes(self, model=None) -> int:
        return self.inspect().num_classes

    def forward_train(self, model, x):
        self._no_torch("training")

    def loss(self, model, raw, boxes, labels):
        self._no_torch("training")

    def kd_loss(self, student_raw, teacher_raw, temperature, cls_weight, box_weight):
        self._no_torch("distillation")

    def prunable(self, model):
        self._no_torch("pruning")

    def prune_spec(self, model, ignore):
        self._no_torch("pruning")

    def after_prune(self, model):
        self._no_torch("pruning")

    def deployable(self, model, max_detections, score_floor, fold=True):
        self._no_torch("export from PyTorch")

    def macs_and_params(self, model: onnx.ModelProto | Path | None = None) -> tuple[int, int]:
        """MACs and parameters counted from the ONNX graph (the imported file by default)."""
        return macs_and_params(self.imported_onnx() if model is None else model)


def adapter(cfg: ModelCfg) -> ImportedOnnxAdapter:
    """The registry's entry for family `onnx` (tasks.models.FAMILIES)."""
    return ImportedOnnxAdapter(cfg)


def prepare(
    cfg: ModelCfg,
    dst: Path,
    *,
    num_classes: int,
    input_size: int,
    max_detections: int,
    score_floor: float,
) -> dict:
    """Check `cfg.onnx` and write the deployable ONNX to `dst` atomically: input `images`
    (B, 3, S, S), outputs `OUTPUTS` (decode + NMS appended for `yolo_raw`). Returns facts for
    the stage's report (convention, size, anchors, decode node count, MACs, params, MD5).

    Raises:
        DataError: the file or its outputs do not match `cfg.outputs`, its class count or
            input size differs from the pipeline's, or its batch axis is fixed.
    """
    from tasks.io import md5_file

    src = Path(cfg.onnx)
    found = inspect(src, cfg.outputs, num_classes, input_size)
    if not found.dynamic_batch:  # exporters bake the batch into reshapes: it cannot be freed
        raise DataError(
            f"{src}: input {found.input_name} has a fixed batch of 1; the pipeline runs "
            "batches: re-export it with a dynamic batch axis (Ultralytics: dynamic=True; "
            "torch.onnx.export: dynamic_shapes)"
        )
    model = to_detections(
        _load(src), num_classes, max_detections, score_floor, cfg.imported.iou_threshold,
        convention=cfg.outputs, input_size=input_size, path=src,
    )  # fmt: skip
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{dst.name}")
    onnx.save(model, str(tmp))
    tmp.replace(dst)
    macs, params = macs_and_params(model)
    return {
        "source": str(src),
        "source_md5": md5_file(src),
        "convention": cfg.outputs,
        "input_size": found.input_size,
        "num_classes": num_classes,
        "anchors": found.anchors,
        "detector_end": detector_end(model),
        "decode_nodes": len(decode_nodes(model)),
        "nodes": len(model.graph.node),
        "macs": macs,
        "params": params,
    }
