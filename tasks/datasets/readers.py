"""The readers by `dataset.format` (builtin is composed by `ingest` and then read as COCO)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.datasets.coco_format import read_coco
from tasks.datasets.common import Source
from tasks.datasets.voc import read_voc
from tasks.datasets.yolo import read_yolo
from tasks.harness.config import DatasetCfg
from tasks.harness.errors import DataError

READERS: dict[str, Callable[[Path, DatasetCfg], Source]] = {
    "coco": read_coco,
    "yolo": read_yolo,
    "voc": read_voc,
}


def read(root: Path, cfg: DatasetCfg, fmt: str | None = None) -> Source:
    """Read the dataset folder `root` as `fmt` (default `cfg.format`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset.path: no such folder")
    return READERS[fmt or cfg.format](root, cfg)
