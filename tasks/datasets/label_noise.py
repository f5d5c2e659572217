"""Known label noise for any COCO split: `tasks.datasets.digits.inject_noise` on images of any size.

`inject_noise` (the digits generator's) clips corrupted boxes to a square canvas; `inject` runs it
with the largest image side and clips every corrupted box to its own image, in the annotations
and in the ground-truth records alike. Used by the shapes generator and by label QA's
measurement of its own rules (`tasks/label_qa/probe.py`).
"""

from __future__ import annotations

import numpy as np

from tasks.datasets.digits import inject_noise
from tasks.harness.config import LabelNoiseCfg


def _clip(bbox: list[float], w: int, h: int) -> list[float]:
    x, y, bw, bh = bbox
    x0, y0 = min(max(x, 0.0), w - 1.0), min(max(y, 0.0), h - 1.0)
    x1, y1 = min(max(x + bw, x0 + 1.0), float(w)), min(max(y + bh, y0 + 1.0), float(h))
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def inject(coco: dict, cfg: LabelNoiseCfg, rng: np.random.Generator, split: str) -> list[dict]:
    """Corrupt `coco["annotations"]` in place (see `tasks.datasets.digits.inject_noise`: exactly
    round(rate * boxes) boxes per kind, none twice) and return the ground truth records
    {split, kind, image_id, annotation_id, original, noisy}."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    side = max((max(s) for s in sizes.values()), default=1)
    truth = inject_noise(coco, cfg, rng, side, split)
    by_id = {a["id"]: a for a in coco["annotations"]}
    for r in truth:
        a = by_id.get(r["annotation_id"])
        if a is None or r["noisy"] is None:
            continue
        a["bbox"] = _clip(a["bbox"], *sizes[a["image_id"]])
        a["area"] = a["bbox"][2] * a["bbox"][3]
        r["noisy"] = {"category_id": a["category_id"], "bbox": list(a["bbox"])}
    return truth
