"""Rules on images: unreadable, wrong size, unlabelled, duplicated, leaked across splits.

Near-duplicates are found with a DCT perceptual hash (pHash, Zauner 2010: the 16x16 lowest
frequencies of the 64x64 grey image, each against their median, 256 bits): two images whose hashes
differ in at most `label_qa.near_duplicate_bits` bits are the same picture up to re-encoding,
resizing or small edits. The classic 8x8 hash is too coarse for smooth, gradient-dominated scenes:
on the default data distinct canvases came within 6 of 64 bits, while JPEG-70 + resized copies
differ by <= 4/64, or <= 14/256 with the 16x16 hash against >= 56/256 between distinct canvases.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tasks.datasets.coco import CocoImage
from tasks.datasets.imagehash import HASH_SIDE, near_pairs, phash  # noqa: F401  (re-exported: core, bench, tests)
from tasks.label_qa.registry import (
    SPLITS,
    Hit,
    Issue,
    QaContext,
    SplitData,
    dataset_rule,
    image_rule,
)


@image_rule("image_unreadable", "error", "drop")
def _unreadable(ctx: QaContext, sd: SplitData, im: CocoImage) -> Issue | None:
    """The file is missing, truncated or not an image (excluded from the manifest)."""
    got = sd.sizes[im.id]
    return Issue(f"cannot read {im.file_name}: {got}") if isinstance(got, str) else None


@image_rule("image_size_mismatch", "error", "drop")
def _size_mismatch(ctx: QaContext, sd: SplitData, im: CocoImage) -> Issue | None:
    """The decoded size differs from the width/height the JSON states (boxes are suspect)."""
    got = sd.sizes[im.id]
    if isinstance(got, tuple) and got != (im.width, im.height):
        return Issue(f"{im.file_name} is {got[0]}x{got[1]}, the JSON says {im.width}x{im.height}")
    return None


@image_rule("image_without_annotations", "warning", "keep")
def _unlabelled(ctx: QaContext, sd: SplitData, im: CocoImage) -> Issue | None:
    """No box at all: a true background image, or a forgotten one."""
    return None if sd.anns_by_image.get(im.id) else Issue(f"{im.file_name} has no annotation")


def _similar_pairs(ctx: QaContext) -> Iterator[tuple[str, int, str, int, int]]:
    """(split a, image a, split b, image b, hamming distance) for every pair within the limit;
    pairs are ordered by split (train < val < test), then by image id."""
    keys = [(s, i) for s in SPLITS if s in ctx.splits for i in ctx.splits[s].hashes]
    if len(keys) < 2:
        return
    h = np.stack([ctx.splits[s].hashes[i] for s, i in keys])  # (N, 4) uint64
    for a, b, d in near_pairs(h, ctx.cfg.near_duplicate_bits):
        yield (*keys[a], *keys[b], d)


@dataset_rule("duplicate_image", "warning", "keep")
def _duplicate_images(ctx: QaContext) -> Iterator[Hit]:
    """Two images of one split are the same picture (perceptual hash): the later is reported."""
    for sa, ia, sb, ib, d in _similar_pairs(ctx):
        if sa == sb:
            yield Hit(sb, ib, None, f"same picture as {sa} image {ia} ({d} bits apart)", d / 256)


@dataset_rule("split_leakage", "error", "drop")
def _leakage(ctx: QaContext) -> Iterator[Hit]:
    """The same picture is in two splits: evaluation would measure memory. The copy in the
    earlier split (train before val before test) is reported and dropped, so the evaluation
    splits stay as they are."""
    for sa, ia, sb, ib, d in _similar_pairs(ctx):
        if sa != sb:
            yield Hit(sa, ia, None, f"same picture as {sb} image {ib} ({d} bits apart)", d / 256)
