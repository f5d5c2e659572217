"""Model inputs decoded once: letterboxed uint8 arrays in a memory-mapped file, reused by every
stage that reads the same images at the same input size.

A split is decoded image by image straight into `<cache>/<key>.npy` (a temp name, then renamed)
and opened read-only with np.load(mmap_mode="r"), so memory holds one full-size image at a time
and the pages of the inputs are file-backed (the kernel can drop them): a dataset larger than RAM
still trains. The key hashes the image root, each file's name and MD5 (or size and mtime when the
manifest has none), the input size and the letterbox version. The folder is
`$SHRINKFLOW_INPUT_CACHE`, else `.cache/inputs` in the working directory (git-ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tasks.preprocess.letterbox import PAD_VALUE, Letterbox, input_wh, letterbox

VERSION = f"letterbox-bilinear-pad{PAD_VALUE}-v2"  # v2: the image size is kept


def cache_dir() -> Path:
    return Path(os.environ.get("SHRINKFLOW_INPUT_CACHE", ".cache/inputs"))


def _key(root: Path, images: Sequence[dict], size: tuple[int, int]) -> str:
    h = hashlib.md5(f"{VERSION}|{Path(root).resolve()}|{size}".encode())
    for im in images:
        stamp = im.get("md5")
        if stamp is None:
            st = (Path(root) / im["file_name"]).stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        h.update(f"|{im['file_name']}:{stamp}".encode())
    return h.hexdigest()


def decoded_inputs(
    root: Path,
    images: Sequence[dict],
    input_size: int | tuple[int, int],
    read: Callable[[Path], np.ndarray],
) -> tuple[np.ndarray, list[Letterbox]]:
    """uint8 (N, H, W, 3) read-only memory map of the letterboxed images and their transforms.

    `read(path)` decodes one image to uint8 (h, w, 3) (and raises what it raises)."""
    tw, th = input_wh(input_size)
    if not images:
        return np.zeros((0, th, tw, 3), np.uint8), []
    folder = cache_dir()
    key = _key(root, images, (tw, th))
    data, side = folder / f"{key}.npy", folder / f"{key}.json"
    if not (data.exists() and side.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=folder)
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(images), th, tw, 3))
            transforms = []
            for i, im in enumerate(images):
                out[i], t = letterbox(read(Path(root) / im["file_name"]), (tw, th))
                transforms.append([t.sx, t.sy, t.pad_x, t.pad_y, t.width, t.height])
            out.flush()
            del out
            Path(tmp).replace(data)
            tmp_side = side.with_name(f".tmp-{os.getpid()}-{side.name}")
            tmp_side.write_text(json.dumps(transforms))
            tmp_side.replace(side)
        finally:
            Path(tmp).unlink(missing_ok=True)
    transforms = [Letterbox(*t) for t in json.loads(side.read_text())]
    return np.load(data, mmap_mode="r"), transforms
