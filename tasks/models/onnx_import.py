"""Model family `onnx`: a detector trained anywhere, imported as an ONNX file.

The file (`model.onnx`) enters the pipeline at `quantize`; the stages that need PyTorch (train,
prune, distill, QAT) have no model to work on and report `skipped: imported ONNX`. Its outputs
follow a declared convention (`model.outputs`, checked by `inspect`: tasks/models/
onnx_inspect.py):

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
from pathlib import Path

import onnx

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
from tasks.models.onnx_graph import fixed_size as _fixed_size
from tasks.models.onnx_graph import graph_inputs as _graph_inputs
from tasks.models.onnx_graph import load as _load
from tasks.models.onnx_graph import macs_and_params
from tasks.models.onnx_inspect import Imported, inspect, inspect_loaded

__all__ = [
    "SKIPPED", "Imported", "ImportedOnnxAdapter", "adapter", "decode_nodes", "detector_end",
    "inspect", "integral_convs", "macs_and_params", "prepare", "to_detections",
]  # fmt: skip
log = logging.getLogger(__name__)

INPUT_NAME = "images"  # what every runner feeds (tasks/engines, tasks/quantize.py)
MIN_OPSET = 13  # ReduceSum with axes as an input; NonMaxSuppression needs 10
SKIPPED = "skipped: imported ONNX"  # what the PyTorch stages report for this family


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
    found = inspect_loaded(model, Path(path), convention, num_classes, input_size)
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
