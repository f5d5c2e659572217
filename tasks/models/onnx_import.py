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
leave the decode in float and the LiteRT target can cut the graph there (tasks/models/
onnx_decode.py). MACs are counted from the graph (`macs_and_params`, tasks/models/onnx_graph.py).

The stages call: `adapter.prepare(...)` (or `prepare`) once, where the other families export;
`macs_and_params(path)` wherever MACs are reported; `decode_nodes` / `integral_convs` for what
INT8 must leave in float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from tasks.harness.errors import ConfigError, DataError
from tasks.harness.signature import OUTPUTS
from tasks.models.config import ModelCfg
from tasks.models.onnx_decode import (
    DECODE_PREFIX,
    DETECTOR_END,
    append_decode,
    decode_nodes,
    detector_end,
    integral_convs,
)
from tasks.models.onnx_graph import dims as _dims
from tasks.models.onnx_graph import dtype as _dtype
from tasks.models.onnx_graph import fixed_size as _fixed_size
from tasks.models.onnx_graph import graph_inputs as _graph_inputs
from tasks.models.onnx_graph import load as _load
from tasks.models.onnx_graph import macs_and_params
from tasks.models.onnx_graph import opset as _opset
from tasks.models.onnx_graph import run_shapes as _run_shapes
from tasks.preprocess.letterbox import input_wh

__all__ = [
    "SKIPPED", "Imported", "ImportedOnnxAdapter", "adapter", "decode_nodes", "detector_end",
    "inspect", "integral_convs", "macs_and_params", "prepare", "to_detections",
]  # fmt: skip
log = logging.getLogger(__name__)

CONVENTIONS = ("detections", "yolo_raw")
INPUT_NAME = "images"  # what every runner feeds (tasks/engines, tasks/quantize.py)
MIN_OPSET = 13  # ReduceSum with axes as an input; NonMaxSuppression needs 10
SKIPPED = "skipped: imported ONNX"  # what the PyTorch stages report for this family
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


# -- inspection -----------------------------------------------------------------------------


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
    return _inspect(_load(Path(path)), Path(path), outputs_convention, num_classes, input_size)


def _inspect(
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


# -- the deployable model --------------------------------------------------------------------


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


def to_detections(
    model: onnx.ModelProto,
    num_classes: int,
    max_detections: int,
    score_floor: float,
    iou_threshold: float,
    *,
    convention: str = "yolo_raw",
    input_size: int | tuple[int, int] | None = None,
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
    append_decode(out, raw, found.num_classes, max_detections, score_floor, iou_threshold,
                   batch if isinstance(batch, int) and batch > 0 else "batch")  # fmt: skip
    out.metadata_props.add(key=DETECTOR_END, value=raw)  # the file's own metadata is kept
    out = onnx.shape_inference.infer_shapes(out)
    onnx.checker.check_model(out)
    return out


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

    def inspect(
        self, num_classes: int | None = None, input_size: int | tuple[int, int] | None = None
    ) -> Imported:
        return inspect(self.imported_onnx(), self.cfg.outputs, num_classes, input_size)

    def prepare(self, dst: Path, *, num_classes: int, input_size: int | tuple[int, int],
                max_detections: int,
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

    def input_size(self, model=None) -> tuple[int, int]:
        """The imported file's input (width, height), read from its graph (ConfigError when
        it is symbolic)."""
        _, _, h, w = _dims(_graph_inputs(_load(self.imported_onnx()))[0])
        if all(isinstance(d, int) and d > 0 for d in (h, w)):
            return w, h
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
    input_size: int | tuple[int, int],
    max_detections: int,
    score_floor: float,
) -> dict:
    """Check `cfg.onnx` and write the deployable ONNX to `dst` atomically: input `images`
    (B, 3, h, w), outputs `OUTPUTS` (decode + NMS appended for `yolo_raw`). Returns facts for
    the stage's report (convention, size, anchors, decode node count, MACs, params, MD5).

    Raises:
        DataError: the file or its outputs do not match `cfg.outputs`, its class count or
            input size differs from the pipeline's, or its batch axis is fixed.
    """
    from tasks.harness.io import md5_file

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
        "input_size": list(found.input_size),
        "num_classes": num_classes,
        "anchors": found.anchors,
        "detector_end": detector_end(model),
        "decode_nodes": len(decode_nodes(model)),
        "nodes": len(model.graph.node),
        "macs": macs,
        "params": params,
    }
