"""One measurement of the input cache, run as its own process by `shrinkflow bench-input-cache`
(`python -m tasks.cli.input_cache_probe ROOT SIZE CACHE BATCH` with the image names on stdin,
one a line): it imports only the cache and the image decoder, decodes the images into the
cache at input side SIZE, reads every batch of BATCH as training does (float32 NCHW), and
prints one JSON object: the decode time, the input array's shape, and this process's memory
(peak RSS, anonymous and file-backed resident MB; `baseline_anon_mb` before the decode).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def process_memory() -> dict[str, float]:
    """This process's peak RSS (VmHWM) and its anonymous and file-backed resident memory now,
    in MB, from /proc/self/status (Linux)."""
    fields = {"VmHWM": "peak_rss_mb", "RssAnon": "anon_mb", "RssFile": "file_rss_mb"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) / 1024  # kB
    return out


def measure(root: Path, names: list[str], size: int, batch: int) -> dict:
    """Decode `names` under `root` into the input cache (`$SHRINKFLOW_INPUT_CACHE`) at `size`,
    then make one pass over every batch; the time and memory of it."""
    from tasks.datasets.coco import read_rgb
    from tasks.preprocess.input_cache import decoded_inputs

    before = process_memory()["anon_mb"]
    t0 = time.perf_counter()
    images, _ = decoded_inputs(root, [{"file_name": n} for n in names], size, read_rgb)
    decode_s = time.perf_counter() - t0
    touched = 0.0
    for i in range(0, len(images), batch):
        x = images[i : i + batch].transpose(0, 3, 1, 2).astype("float32") / 255.0
        touched += float(x[:, :, 0, 0].sum())  # read, as a training step reads it
    return {
        "decode_s": decode_s,
        "shape": list(images.shape),
        "baseline_anon_mb": before,
        **process_memory(),
    }


if __name__ == "__main__":
    root, size, cache, batch = sys.argv[1:5]
    os.environ["SHRINKFLOW_INPUT_CACHE"] = cache
    names = sys.stdin.read().split()
    print(json.dumps(measure(Path(root), names, int(size), int(batch))))
