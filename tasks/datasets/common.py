"""What every dataset reader shares: the `Source` it returns, image facts, format sniffing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tasks.harness.errors import DataError

SPLITS = ("train", "val", "test")
POOL = "all"  # the one split of a dataset that has no train/val/test of its own
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Source:
    """A dataset as read: COCO-style dicts per split (or one pool under `POOL`).

    splits[name] = {"images": [{id, file_name, width, height, ...}], "annotations": [{id,
    image_id, category_id, bbox [x, y, w, h] px, area, iscrowd, ...}]}; file names are POSIX
    paths relative to `root`; categories [{id, name}] are shared by every split.
    """

    format: str
    root: Path
    categories: list[dict]
    splits: dict[str, dict]
    files: list[Path] = field(default_factory=list)  # annotation files read (images are added)
    notes: dict = field(default_factory=dict)  # counts for the metrics (negatives, ...)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when the file is missing or unreadable
    (label QA reports those as `image_unreadable`)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        return None


def relative(root: Path, path: Path, source: Path, field_name: str) -> str:
    """`path` relative to `root` as POSIX text; a path outside the root raises DataError."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(base):
        raise DataError(f"{source}: {field_name}: {path} is outside the dataset folder {root}")
    return resolved.relative_to(base).as_posix()


def box_entry(ann_id: int, image_id: int, category_id: int, xywh, iscrowd: int = 0) -> dict:
    """A COCO annotation with the box rounded to 1/100 px (exporters' float noise)."""
    x, y, w, h = (round(float(v), 2) for v in xywh)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": round(w * h, 4),
        "iscrowd": int(iscrowd),
    }


def looks_like(root: Path) -> list[str]:
    """What the folder's contents look like, for error messages: e.g. ['yolo (data.yaml)']."""
    found = []
    if Path(root, "Annotations").is_dir():
        found.append("voc (Annotations/)")
    yamls = sorted(p.name for p in Path(root).glob("*.yaml"))
    if yamls:
        found.append(f"yolo ({', '.join(yamls)})")
    jsons = sorted(p.name for p in Path(root).glob("*.json"))
    if jsons:
        found.append(f"coco ({', '.join(jsons[:4])}{', ...' if len(jsons) > 4 else ''})")
    return found


def mismatch(fmt: str, root: Path, expected: str) -> DataError:
    """`dataset.format` and the folder disagree: say what was expected and what was found."""
    found = looks_like(root)
    seen = f"it looks like {' / '.join(found)}" if found else "found none of the known layouts"
    return DataError(
        f"{root}: dataset.format is {fmt}, which expects {expected}; {seen} "
        "(set dataset.format to match the folder)"
    )
