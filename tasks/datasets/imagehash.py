"""Perceptual image hash (DCT pHash, 256 bits) and near-duplicate grouping.

The hash (Zauner 2010): the 16x16 lowest DCT frequencies of the 64x64 grey image, each compared
with their median. Two images whose hashes differ in at most a few bits are the same picture up to
re-encoding, resizing or small edits. Label QA flags such pairs (duplicates, split leakage);
`ingest` keeps them in one split when it splits a dataset.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_SIDE = 16  # 16x16 frequencies = 256 bits


def phash(rgb: np.ndarray) -> np.ndarray:
    """256-bit perceptual hash of a uint8 (H, W, 3) image, as 4 uint64 words."""
    side = 4 * HASH_SIDE
    grey = Image.fromarray(rgb).convert("L").resize((side, side), Image.LANCZOS)
    freq = dctn(np.asarray(grey, np.float64), norm="ortho")[:HASH_SIDE, :HASH_SIDE].ravel()
    bits = freq > np.median(freq[1:])  # the DC term would dominate the median
    return np.packbits(bits).view(np.uint64)


def near_pairs(hashes: np.ndarray, max_bits: int) -> Iterator[tuple[int, int, int]]:
    """(i, j, hamming distance) with i < j for every pair of rows of `hashes` (N, 4) uint64 within
    `max_bits`; computed in (256, N) blocks to bound the memory."""
    for start in range(0, len(hashes), 256):
        block = np.bitwise_count(hashes[start : start + 256, None] ^ hashes[None, :]).sum(-1)
        for r, c in zip(*np.nonzero(block <= max_bits), strict=True):
            if int(c) > start + int(r):
                yield start + int(r), int(c), int(block[r, c])


def near_duplicate_groups(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """A group label per row: rows linked by a chain of near-duplicate pairs share one (N,) int."""
    parent = np.arange(len(hashes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j, _ in near_pairs(hashes, max_bits):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(len(hashes))], dtype=np.int64)
