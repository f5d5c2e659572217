"""Rules on the ids of a COCO file: an id names one image or one annotation, never two.

With a repeated image id, annotations attach to whichever image a reader keeps last, and
pycocotools scores them against the wrong picture; a repeated annotation id makes fixes and
drops by id hit two boxes. Both are errors, found before any other rule trusts the ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from tasks.label_qa.registry import Hit, QaContext, dataset_rule


@dataset_rule("duplicate_image_id", "error", "drop")
def _duplicate_image_ids(ctx: QaContext) -> Iterator[Hit]:
    """Two or more images share one id: every image with that id (and its boxes) is reported
    and dropped by default (which box belongs to which image is unknown)."""
    for sd in ctx.splits.values():
        counts = Counter(im.id for im in sd.coco.images)
        for image_id, n in sorted(counts.items()):
            if n > 1:
                names = [im.file_name for im in sd.coco.images if im.id == image_id]
                msg = f"image id {image_id} is used by {n} images: {', '.join(names)}"
                yield Hit(sd.name, image_id, None, msg)


@dataset_rule("duplicate_annotation_id", "error", "drop")
def _duplicate_annotation_ids(ctx: QaContext) -> Iterator[Hit]:
    """Two or more annotations share one id: reported once per id and dropped by default (a
    fix or drop by id could not tell them apart)."""
    for sd in ctx.splits.values():
        counts = Counter(a.id for a in sd.coco.annotations)
        for ann_id, n in sorted(counts.items()):
            if n > 1:
                first = next(a for a in sd.coco.annotations if a.id == ann_id)
                msg = f"annotation id {ann_id} is used by {n} annotations"
                yield Hit(sd.name, first.image_id, ann_id, msg)
