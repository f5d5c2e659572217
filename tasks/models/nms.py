"""Batched, class-aware NMS as one PyTorch op that exports to one ONNX `NonMaxSuppression`.

`torchvision.ops.nms` takes one list of boxes, so a batch of images with several classes has to
be made one list by shifting each (image, class) group's boxes apart: offsets that reach
(images x classes) x the image side. In float32 that is exact; in float16 (ONNX Runtime's
converter, the `fp16` variant) the spacing at 41,000 px is 32 px, the shifted boxes collapse and
NMS keeps duplicates. ONNX's `NonMaxSuppression` itself is batched and per class:
boxes (B, N, 4), scores (B, C, N) -> selected (M, 3) int64 rows [image, class, box]. This op has
exactly those semantics, runs them in eager PyTorch (per image, torchvision's `batched_nms` in
float32), and maps to that single ONNX node in both exporters (`ONNX_TRANSLATIONS` for
`torch.onnx.export(dynamo=True)`, a TorchScript symbolic registered on import), so every runtime
gets coordinates in their own range.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

__all__ = ["ONNX_TRANSLATIONS", "batched_class_nms"]


def batched_class_nms(
    boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou: float, score_floor: float
) -> torch.Tensor:
    """ONNX `NonMaxSuppression` (center_point_box=0): boxes (B, N, 4) x1y1x2y2, scores (B, C, N)
    -> (M, 3) int64 [image, class, box], at most `max_per_class` per image and class, only
    boxes scoring above `score_floor`, suppressed above IoU `iou` within a class.

    While an exporter traces, the registered op (`torch.ops.shrinkflow.batched_class_nms`); in
    eager PyTorch the plain function: a custom op's first eager call imports torch._dynamo,
    which crashes a process that has loaded TensorFlow (evaluate on LiteRT) first; the eager
    path needs torchvision imported before TensorFlow too (`YoloWithNms` does so)."""
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return _op(boxes, scores, max_per_class, iou, score_floor)
    return _eager(boxes, scores, max_per_class, iou, score_floor)


def _eager(
    boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou: float, score_floor: float
) -> torch.Tensor:
    import torchvision

    rows = []
    for image in range(boxes.shape[0]):
        cls, box = torch.nonzero(scores[image] > score_floor, as_tuple=True)
        if box.numel() == 0:
            continue
        score = scores[image, cls, box].float()
        keep = torchvision.ops.batched_nms(boxes[image, box].float(), score, cls, iou)
        cls, box = cls[keep], box[keep]  # by descending score
        onehot = torch.nn.functional.one_hot(cls, scores.shape[1])
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # each kept box's place in its class
        cls, box = cls[rank < max_per_class], box[rank < max_per_class]
        rows.append(torch.stack([torch.full_like(cls, image), cls, box], dim=1))
    if not rows:
        return torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)
    return torch.cat(rows).to(torch.int64)


@torch.library.custom_op("shrinkflow::batched_class_nms", mutates_args=())
def _op(
    boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou: float, score_floor: float
) -> torch.Tensor:
    return _eager(boxes, scores, max_per_class, iou, score_floor)


@_op.register_fake
def _(boxes, scores, max_per_class, iou, score_floor):
    m = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((m, 3), dtype=torch.int64)


def _onnx(boxes, scores, max_per_class: int, iou: float, score_floor: float):
    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou]),
        op.Constant(value_floats=[score_floor]),
        center_point_box=0,
    )


# torch.onnx.export(dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)
ONNX_TRANSLATIONS = {torch.ops.shrinkflow.batched_class_nms.default: _onnx}


def _symbolic(g, boxes, scores, max_per_class, iou, score_floor):
    from torch.onnx.symbolic_helper import _maybe_get_const

    def const(value, kind):
        return g.op("Constant", value_t=torch.tensor([_maybe_get_const(value, kind)]))

    return g.op(
        "NonMaxSuppression",
        boxes,
        scores,
        const(max_per_class, "i"),
        const(iou, "f"),
        const(score_floor, "f"),
        center_point_box_i=0,
    )


torch.onnx.register_custom_op_symbolic("shrinkflow::batched_class_nms", _symbolic, 11)
