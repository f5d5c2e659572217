"""Rules on single boxes and on pairs of boxes in one image."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tasks.datasets.coco import CocoAnnotation
from tasks.label_qa.registry import Hit, Issue, QaContext, SplitData, annotation_rule, dataset_rule

EDGE_TOLERANCE = 0.5  # px: sub-pixel rounding in exporters is not an error


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), both xywh: (N, M)."""
    a0, b0 = a[:, None, :2], b[None, :, :2]
    a1, b1 = a0 + a[:, None, 2:], b0 + b[None, :, 2:]
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None).prod(-1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@annotation_rule("unknown_image", "error", "drop")
def _unknown_image(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """The annotation names an image id that the file does not list."""
    return None if a.image_id in sd.images else Issue(f"image_id {a.image_id} is not in images")


@annotation_rule("unknown_category", "error", "drop")
def _unknown_category(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """The annotation's category id is not among the file's categories."""
    known = {c.id for c in sd.coco.categories}
    return None if a.category_id in known else Issue(f"category_id {a.category_id} unknown")


@annotation_rule("box_empty", "error", "drop")
def _box_empty(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """Zero or negative width or height."""
    _, _, w, h = a.bbox
    return None if w > 0 and h > 0 else Issue(f"bbox {list(a.bbox)} has no positive area")


@annotation_rule("box_outside_image", "error", "fix")
def _box_outside(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """The box leaves its image; the fix clips it to the image (none when nothing is left)."""
    im = sd.images.get(a.image_id)
    x, y, w, h = a.bbox
    if im is None or w <= 0 or h <= 0:
        return None  # unknown_image / box_empty report these
    t = EDGE_TOLERANCE
    if x >= -t and y >= -t and x + w <= im.width + t and y + h <= im.height + t:
        return None
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(im.width)), min(y + h, float(im.height))
    fix = {"bbox": [x0, y0, x1 - x0, y1 - y0]} if x1 > x0 and y1 > y0 else None
    return Issue(f"bbox {list(a.bbox)} leaves the {im.width}x{im.height} image", fix=fix)


@annotation_rule("box_too_small", "warning", "keep")
def _box_small(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """Narrower or shorter than `label_qa.min_box_px`."""
    _, _, w, h = a.bbox
    if 0 < min(w, h) < ctx.cfg.min_box_px:
        return Issue(f"bbox {w:g}x{h:g} is below min_box_px={ctx.cfg.min_box_px:g}")
    return None


@annotation_rule("box_extreme_aspect", "warning", "keep")
def _box_aspect(ctx: QaContext, sd: SplitData, a: CocoAnnotation) -> Issue | None:
    """Longer than `label_qa.max_aspect` times its other side."""
    _, _, w, h = a.bbox
    if w > 0 and h > 0 and max(w / h, h / w) > ctx.cfg.max_aspect:
        return Issue(f"bbox {w:g}x{h:g}: aspect {max(w / h, h / w):.1f} > {ctx.cfg.max_aspect:g}")
    return None


def _overlapping_pairs(sd: SplitData) -> Iterator[tuple[CocoAnnotation, CocoAnnotation, float]]:
    """Every pair of positive-area boxes in one image, with their IoU (later id second)."""
    for anns in sd.anns_by_image.values():
        anns = sorted((a for a in anns if a.bbox[2] > 0 and a.bbox[3] > 0), key=lambda a: a.id)
        if len(anns) < 2:
            continue
        ious = iou_matrix(*(np.array([a.bbox for a in anns], float),) * 2)
        for i, j in zip(*np.triu_indices(len(anns), k=1), strict=True):
            if ious[i, j] > 0:
                yield anns[i], anns[j], float(ious[i, j])


@dataset_rule("duplicate_box", "error", "drop")
def _duplicates(ctx: QaContext) -> Iterator[Hit]:
    """Two boxes of the same class with IoU >= `label_qa.duplicate_iou`: the later one is
    reported (and dropped by default)."""
    for sd in ctx.splits.values():
        for a, b, iou in _overlapping_pairs(sd):
            if a.category_id == b.category_id and iou >= ctx.cfg.duplicate_iou:
                msg = f"duplicates annotation {a.id} (same class, IoU {iou:.2f})"
                yield Hit(sd.name, b.image_id, b.id, msg, 1 - iou)


@dataset_rule("conflicting_boxes", "error", "drop")
def _conflicts(ctx: QaContext) -> Iterator[Hit]:
    """Two boxes of different classes with IoU >= `label_qa.conflict_iou`: one object, two
    labels. Both are reported (dropped by default: which one is right is unknown)."""
    for sd in ctx.splits.values():
        for a, b, iou in _overlapping_pairs(sd):
            if a.category_id != b.category_id and iou >= ctx.cfg.conflict_iou:
                for this, other in ((a, b), (b, a)):
                    msg = (
                        f"class {sd.category_name(this.category_id)!r} conflicts with annotation "
                        f"{other.id} (class {sd.category_name(other.category_id)!r}, IoU {iou:.2f})"
                    )
                    yield Hit(sd.name, this.image_id, this.id, msg, 1 - iou)
