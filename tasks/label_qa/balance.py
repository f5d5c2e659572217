"""Class balance: boxes per class per split, and a warning for classes under a floor."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from tasks.label_qa.registry import Hit, QaContext, dataset_rule


def class_counts(ctx: QaContext) -> dict[str, dict[str, int]]:
    """split -> category name -> boxes (every category of the file, zeros included)."""
    out = {}
    for sd in ctx.splits.values():
        counts = Counter(a.category_id for a in sd.coco.annotations)
        out[sd.name] = {c.name: counts.get(c.id, 0) for c in sd.coco.categories}
    return out


@dataset_rule("class_below_floor", "warning", "keep")
def _rare_classes(ctx: QaContext) -> Iterator[Hit]:
    """A class has fewer than `label_qa.min_class_count` boxes in a split (too few to learn or
    to measure)."""
    floor = ctx.cfg.min_class_count
    for split, counts in class_counts(ctx).items():
        for name, n in counts.items():
            if n < floor:
                yield Hit(split, None, None, f"class {name!r} has {n} boxes (< {floor})", n / floor)
