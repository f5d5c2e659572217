"""Split one pool of images into train/val/test, keeping near-duplicates together.

Images whose perceptual hashes are within `max_bits` (label QA's `near_duplicate_bits`) are
linked; linked images form a group, and whole groups are dealt to test, then val, then train in a
seeded random order until each split has its share. Label QA's `split_leakage` then finds nothing
that the split itself caused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.datasets.coco import read_rgb
from tasks.datasets.common import SPLITS
from tasks.datasets.imagehash import near_duplicate_groups, phash
from tasks.harness.config import SplitCfg


def split_pool(pool: dict, root: Path, cfg: SplitCfg, max_bits: int) -> dict[str, dict]:
    """{split: {"images", "annotations"}} from one pool (ids are kept: unique within it)."""
    images = pool["images"]
    hashes = np.zeros((len(images), 4), np.uint64)
    readable = np.ones(len(images), bool)
    for k, im in enumerate(images):
        try:
            hashes[k] = phash(read_rgb(Path(root) / im["file_name"]))
        except OSError:  # unreadable: its own group (label QA reports it)
            readable[k] = False
    groups = np.arange(len(images))
    idx = np.flatnonzero(readable)
    if len(idx):
        groups[idx] = idx[near_duplicate_groups(hashes[idx], max_bits)]
    order = np.random.default_rng(cfg.seed).permutation(np.unique(groups))
    quota = {"test": round(cfg.test * len(images)), "val": round(cfg.val * len(images))}
    members = {g: np.flatnonzero(groups == g) for g in order}
    assign: dict[int, str] = {}
    filled = {"test": 0, "val": 0}
    for g in order:
        target = next((s for s in ("test", "val") if filled[s] < quota[s]), "train")
        if target != "train":
            filled[target] += len(members[g])
        for k in members[g]:
            assign[int(k)] = target
    out = {s: {"images": [], "annotations": []} for s in SPLITS}
    split_of_image = {}
    for k, im in enumerate(images):
        out[assign[k]]["images"].append(im)
        split_of_image[im["id"]] = assign[k]
    for a in pool["annotations"]:
        s = split_of_image.get(a["image_id"], "train")  # an unknown image id: label QA reports
        out[s]["annotations"].append(a)
    return out
