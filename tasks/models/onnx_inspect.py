"""Checking an imported ONNX (family `onnx`, tasks/models/onnx_import.py) against its declared
output convention (`model.outputs`): one (B, 3, H, W) float image input whose size agrees with
the pipeline's, a dynamic batch axis (or 1), and outputs that are the project's signature
(`detections`) or one raw (B, 4 + C, N) tensor with the dataset's class count (`yolo_raw`).
Every refusal is one line naming the file, what was found and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from tasks.harness.errors import ConfigError, DataError
from tasks.harness.signature import OUTPUTS
from tasks.models.onnx_graph import dims as _dims
from tasks.models.onnx_graph import dtype as _dtype
from tasks.models.onnx_graph import fixed_size as _fixed_size
from tasks.models.onnx_graph import graph_inputs as _graph_inputs
from tasks.models.onnx_graph import load as _load
from tasks.models.onnx_graph import opset as _opset
from tasks.models.onnx_graph import run_shapes as _run_shapes
from tasks.preprocess.letterbox import input_wh

CONVENTIONS = ("detections", "yolo_raw")
EXPECTED_DETECTIONS = (
    "num_detections (B,) int32, boxes (B,K,4) float, scores (B,K) float, classes (B,K) int32"
)
EXPECTED_RAW = "one output (B, 4+C, N) float: cx, cy, w, h, then C class scores"


@dataclass(frozen=True)
class Imported:
    """What `inspect` found in an imported ONNX.

    `input_size`: (width, height) of the image input (static in the file, or the declared
    one);
    `raw_output`: for `yolo_raw`, the (B, 4 + C, N) tensor's name; `anchors`: its N.
    """

    path: Path
    convention: str
    input_name: str
    input_size: tuple[int, int]
    dynamic_batch: bool
    num_classes: int
    outputs: dict[str, list]  # name -> shape (ints, or dim names for symbolic axes)
    raw_output: str | None = None
    anchors: int | None = None
    opset: int = 0


def _describe(values) -> str:
    return (
        ", ".join(f"{v.name} ({','.join(str(d) for d in _dims(v))}) {_dtype(v)}" for v in values)
        or "none"
    )


def inspect(
    path: Path,
    outputs_convention: str,
    num_classes: int | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> Imported:
    """Load and check an imported ONNX against its declared output convention.

    Args:
        path: the ONNX file (`model.onnx`).
        outputs_convention: `detections` or `yolo_raw` (`model.outputs`).
        num_classes: the dataset's class count; a model with another count is an error.
        input_size: the pipeline's input, (width, height) or a side; required when the file's
            height/width are symbolic; when both are known they must agree.

    Returns:
        Imported: the input's name and size, the output shapes found, the class count.

    Raises:
        ConfigError: unknown convention.
        DataError: not a valid ONNX; not one (B, 3, H, W) float image input; outputs not the
            declared convention (the message lists the names and shapes found and expected);
            a class count different from the dataset's.
    """
    return inspect_loaded(
        _load(Path(path)), Path(path), outputs_convention, num_classes, input_size
    )


def inspect_loaded(
    model: onnx.ModelProto,
    path: Path,
    outputs_convention: str,
    num_classes: int | None,
    input_size: int | tuple[int, int] | None,
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
            f"{path}: inputs found: {found_in}; expected one image input (B,3,H,W) float32"
        )
    h, w = dims[2], dims[3]
    fixed = [isinstance(d, int) and d > 0 for d in (w, h)]
    static = all(fixed)
    wanted = None if input_size is None else input_wh(input_size)
    clash = [f and d != x for f, d, x in zip(fixed, (w, h), wanted or (w, h), strict=True)]
    if any(clash):  # a side fixed in the file differs from the pipeline's
        raise DataError(
            f"{path}: input {inputs[0].name} is (width, height) [{w}, {h}] but the pipeline's "
            f"train.input_size is [{wanted[0]}, {wanted[1]}]; set train.input_size: [{w}, {h}] "
            "or export the model at the pipeline's size"
        )
    size = (w, h) if static else wanted
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
