"""The YOLO family's graph: the surgery that makes an Ultralytics model prunable and rebuildable,
and the deployed head (decode + NMS in the graph).

- `C2fSplit` / `split_c2f`: every `C2f` / `C3k2` with its first conv as two convs instead of one
  conv + `chunk(2)` (the same function; torch-pruning can prune the halves independently and a
  pruned model is rebuilt from conv widths alone: `conv_widths` / `apply_widths`).
- `check_supported`: a plain YOLOv8 / YOLO11 detection model, or a DataError naming the file.
- `YoloWithNms`: images to the project's `OUTPUTS` (Ultralytics' decode, batched class-aware
  NMS exported as one ONNX `NonMaxSuppression`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.harness.errors import DataError
from tasks.models.nms import batched_class_nms
from tasks.preprocess.letterbox import input_wh

IOU_THRESHOLD = 0.7  # Ultralytics' default NMS IoU (`iou` in its default.yaml)
# layer types of the YOLOv8 / YOLO11 detect models this adapter prunes, saves and exports
SUPPORTED_LAYERS = {"Conv", "C2f", "C3k2", "SPPF", "C2PSA", "Concat", "Upsample", "Detect"}


class C2fSplit(nn.Module):
    """`C2f` (and YOLO11's `C3k2`) with `cv1(x).chunk(2)` computed by two convs, `cv0` and
    `cv1`, each making one half: the same function, traceable by torch-pruning's DepGraph and
    rebuildable from conv widths alone. `f`, `i`, `type`, `np` are Ultralytics' layer tags."""

    def __init__(self, block: nn.Module):
        super().__init__()
        from ultralytics.nn.modules import Conv

        conv, bn = block.cv1.conv, block.cv1.bn
        half = conv.out_channels // 2
        self.cv0 = Conv(conv.in_channels, half, 1, 1)
        self.cv1 = Conv(conv.in_channels, half, 1, 1)
        for k, part in enumerate((self.cv0, self.cv1)):
            rows = slice(k * half, (k + 1) * half)
            part.act = copy.deepcopy(block.cv1.act)
            part.conv.weight.data = conv.weight.data[rows].clone()
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(part.bn, name).data = getattr(bn, name).data[rows].clone()
            part.bn.eps, part.bn.momentum = bn.eps, bn.momentum
            part.bn.num_batches_tracked.data = bn.num_batches_tracked.data.clone()
        self.cv2, self.m = block.cv2, block.m
        for tag in ("f", "i", "type", "np"):
            if hasattr(block, tag):
                setattr(self, tag, getattr(block, tag))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def split_c2f(model: nn.Module) -> None:
    """Replace every `C2f` / `C3k2` layer of `model.model` by its `C2fSplit` (in place)."""
    from ultralytics.nn.modules import C2f

    for k, layer in enumerate(model.model):
        if isinstance(layer, C2f):
            model.model[k] = C2fSplit(layer)


def detect_head(model: nn.Module) -> nn.Module:
    return model.model[-1]


def check_supported(model: nn.Module, where: str) -> None:
    """Raise DataError unless `model` is a plain YOLOv8 / YOLO11 detection model."""
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel

    if type(model) is not DetectionModel:
        raise DataError(
            f"{where}: expected an Ultralytics detection model, found "
            f"{type(model).__name__} (task {getattr(model, 'task', '?')!r})"
        )
    head = detect_head(model)
    if type(head) is not Detect or getattr(head, "end2end", False):
        raise DataError(
            f"{where}: expected a YOLOv8 / YOLO11 Detect head, found "
            f"{type(head).__name__}{' (end-to-end)' if type(head) is Detect else ''}"
        )
    found = sorted({type(m).__name__ for m in model.model} - SUPPORTED_LAYERS - {"C2fSplit"})
    if found:
        raise DataError(
            f"{where}: not a YOLOv8 / YOLO11 model: layer types {found} are not "
            f"among the supported {sorted(SUPPORTED_LAYERS)}"
        )


def conv_widths(model: nn.Module) -> dict[str, list[int]]:
    """Every conv's [in, out, groups] and every BatchNorm's [features], by module path."""
    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = [m.in_channels, m.out_channels, m.groups]
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = [m.num_features]
    return out


def apply_widths(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Replace each conv / BatchNorm whose recorded width differs by a fresh one of that width
    (the pruned model's shapes), so that its state_dict loads."""
    modules = dict(model.named_modules())
    for name, want in widths.items():
        m = modules.get(name)
        if isinstance(m, nn.Conv2d) and [m.in_channels, m.out_channels, m.groups] != want:
            new = nn.Conv2d(
                want[0],
                want[1],
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                want[2],
                m.bias is not None,
                m.padding_mode,
            )
        elif isinstance(m, nn.BatchNorm2d) and [m.num_features] != want:
            new = nn.BatchNorm2d(want[0], m.eps, m.momentum, m.affine, m.track_running_stats)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, new)


def raw_head(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Run the layers as `DetectionModel._predict_once` does, the Detect head by its
    mode-independent `forward_head`: {"boxes", "scores", "feats"} whatever the mode."""
    *body, head = model.model
    saved, y = set(model.save), []
    for m in (*body, head):
        if m.f != -1:  # inputs from earlier layers
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        if m.i == head.i:
            return head.forward_head(x, **head.one2many)
        x = m(x)
        y.append(x if m.i in saved else None)
    raise RuntimeError("yolo: model has no Detect head")


class YoloWithNms(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> `OUTPUTS`: num_detections (B,) int32, boxes (B, K, 4)
    xyxy input pixels, scores (B, K) descending, classes (B, K) int32; padding rows are zeros.

    Decode is Ultralytics' (DFL expectation, anchor centres, `dist2bbox`); each anchor keeps its
    best class (Ultralytics' single-label predict). The top `pre_nms` anchors per image go
    through one batched, class-aware NMS (`tasks.models.nms`: ONNX `NonMaxSuppression` with
    the batch and classes as its own axes, so no coordinate leaves the image's range and FP16
    stays exact enough). Kept candidates are marked by a scatter and the top K taken per image.
    """

    def __init__(
        self, model: nn.Module, size: tuple[int, int], max_detections: int, score_floor: float
    ):
        import torchvision  # noqa: F401  (its ops import torch._dynamo, and so triton: that
        # must happen before a stage loads TensorFlow (LiteRT), after which it segfaults)

        super().__init__()
        self.model, self.size = model, input_wh(size)  # (w, h)
        self.k, self.score_floor = int(max_detections), float(score_floor)
        self.iou = IOU_THRESHOLD

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ultralytics.utils.tal import dist2bbox, make_anchors

        head = detect_head(self.model)
        raw = raw_head(self.model, x)
        anchors, strides = make_anchors(raw["feats"], head.stride, 0.5)  # (A, 2), (A, 1)
        dist = head.dfl(raw["boxes"])  # (B, 4, A) expected side distances, in strides
        boxes = dist2bbox(dist, anchors.transpose(0, 1).unsqueeze(0), xywh=False, dim=1)
        boxes = (boxes * strides.transpose(0, 1)).transpose(1, 2)
        iw, ih = self.size
        if iw == ih:
            boxes = boxes.clamp(0.0, float(iw))
        else:
            limit = torch.tensor([iw, ih, iw, ih], dtype=boxes.dtype, device=boxes.device)
            boxes = torch.minimum(boxes.clamp(min=0.0), limit)
        conf, cls = raw["scores"].sigmoid().max(1)  # (B, A)
        b, a = conf.shape
        n = min(a, max(1000, 3 * self.k))  # pre-NMS candidates per image
        top, idx = conf.topk(n, dim=1)  # (B, n), descending
        cand = boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))  # (B, n, 4)
        cand_cls = cls.gather(1, idx)
        # each candidate scores for its own class only (Ultralytics' single-label predict)
        class_scores = torch.zeros(b, head.nc, n, dtype=top.dtype, device=x.device)
        class_scores = class_scores.scatter(1, cand_cls.unsqueeze(1), top.unsqueeze(1))
        chosen = batched_class_nms(cand, class_scores, self.k, self.iou, self.score_floor)
        flat = chosen[:, 0] * n + chosen[:, 2]  # (M,) kept candidates, over the whole batch
        kept = torch.zeros(b * n, dtype=top.dtype, device=x.device).scatter(
            0, flat, torch.ones_like(flat, dtype=top.dtype)
        )
        live = kept.view(b, n) > 0
        ranked = torch.where(live, top, torch.full_like(top, -1.0))
        if n < self.k:  # fewer anchors than K: pad the candidate list
            ranked = F.pad(ranked, (0, self.k - n), value=-1.0)
            cand, cand_cls = F.pad(cand, (0, 0, 0, self.k - n)), F.pad(cand_cls, (0, self.k - n))
        scores, order = ranked.topk(self.k, dim=1)  # (B, K)
        valid = scores >= 0
        num = valid.sum(1).to(torch.int32)
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        out_boxes = cand.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
        out_boxes = torch.where(valid.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes))
        classes = torch.where(valid, cand_cls.gather(1, order), torch.zeros_like(order))
        return num, out_boxes, scores, classes.to(torch.int32)
