"""COCO detection files: schema (pydantic), safe paths, and the letterboxed dataset `train` reads.

A file that is not UTF-8 JSON or breaks the schema raises DataError naming the file and the field
(`train.json: images[3].width: Input should be a valid integer`). Problems *within* a valid file
(a box outside its image, an unreadable PNG) are label-QA findings, not errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.harness.errors import DataError
from tasks.preprocess.input_cache import decoded_inputs
from tasks.preprocess.letterbox import Letterbox, letterbox


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")  # COCO files carry extra fields (license, ...)


class CocoImage(_Entry):
    id: int
    file_name: str = Field(min_length=1)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class CocoAnnotation(_Entry):
    id: int
    image_id: int
    category_id: int
    bbox: list[float] = Field(min_length=4, max_length=4)
    iscrowd: int = 0


class CocoCategory(_Entry):
    id: int
    name: str


class CocoFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    categories: list[CocoCategory] = Field(min_length=1)


def read_json(path: Path):
    """Parse a UTF-8 JSON file. Raises DataError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e


def parse_coco(raw, path: Path, where: str = "") -> CocoFile:
    """Schema-check a parsed COCO dict; DataError names the file and the field (under `where`)."""
    if not isinstance(raw, dict):
        where = where or "<root>"
        raise DataError(
            f"{path}: {where}: expected a JSON object with images/annotations/categories"
        )
    try:
        return CocoFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        loc = f"{where}{loc}" if where else loc.lstrip(".")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise DataError(f"{path}: {loc}: {first['msg']}{more}") from e


def load_coco(path: Path) -> CocoFile:
    """Parse and schema-check a COCO file. Raises DataError naming the file and the field."""
    return parse_coco(read_json(path), Path(path))


def load_manifest_split(path: Path, split: str) -> tuple[Path, CocoFile]:
    """(image root, one split) of the manifest `ingest` writes ({root, splits: {split: COCO}})."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("root"), str):
        raise DataError(f"{path}: root: missing (not a manifest written by ingest)")
    return Path(raw["root"]), parse_coco(
        (raw.get("splits") or {}).get(split), path, f"splits.{split}"
    )


def resolve_image(root: Path, file_name: str, source: Path, field: str) -> Path:
    """The image path under `root`; a name that escapes the root raises DataError."""
    root = Path(root).resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{source}: {field}: path {file_name!r} escapes the dataset root {root}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image fully: uint8 (H, W, 3).

    Raises:
        OSError: a truncated or corrupt file, or one over PIL's pixel limit (a decompression
            bomb), with the file named.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise OSError(f"{path}: too many pixels to decode safely ({e})") from e


def to_input(rgb: np.ndarray, input_size: int | tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Letterbox uint8 (H, W, 3) into the model input: uint8 (S_h, S_w, 3) and the transform
    whose `to_image` maps input pixels back to the image. DetectionSet and the served model share
    this (see tasks/preprocess/letterbox.py)."""
    return letterbox(rgb, input_size)


class DetectionSet:
    """One split of a manifest, decoded once and letterboxed to the model input.

    images: uint8 (N, S_h, S_w, 3), a read-only memory map (tasks/preprocess/input_cache.py);
    boxes[i]: float32 (M, 4) xyxy in input pixels; labels[i]: int64 (M,) contiguous class
    indices; `letterboxes[i]` maps input pixels back to image i. `iscrowd` annotations (COCO
    crowds, VOC `difficult`) are not training targets: they are left out of boxes/labels and stay
    in `coco`, where pycocotools treats them as ignore regions. Images without boxes are kept
    (negatives).
    """

    def __init__(self, manifest: dict, split: str, input_size: int | tuple[int, int]) -> None:
        coco = manifest["splits"][split]
        root = Path(manifest["root"])
        self.coco = coco
        self.categories = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        cat_index = {cid: i for i, cid in enumerate(self.categories)}
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            if not a.get("iscrowd", 0):
                by_image.setdefault(a["image_id"], []).append(a)
        self.images, self.letterboxes = decoded_inputs(root, coco["images"], input_size, read_rgb)
        self.ids, self.boxes, self.labels = [], [], []
        for im, lb in zip(coco["images"], self.letterboxes, strict=True):
            anns = by_image.get(im["id"], [])
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            self.ids.append(im["id"])
            self.boxes.append(lb.to_input(xyxy))
            self.labels.append(
                np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
            )

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: np.ndarray | slice) -> np.ndarray:
        """float32 (B, 3, S_h, S_w) in [0, 1]."""
        return self.images[idx].transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def load_splits(manifest: Path, input_size: int) -> tuple[dict, DetectionSet, DetectionSet]:
    """The manifest written by label_qa, with its train and val splits decoded."""
    m = json.loads(Path(manifest).read_text())
    return m, DetectionSet(m, "train", input_size), DetectionSet(m, "val", input_size)


def read_manifest(path: Path) -> dict:
    """The manifest label_qa wrote ({"root", "splits"}). Raises DataError naming the file."""
    path = Path(path)
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON manifest: {e}") from e
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict) or "root" not in m:
        raise DataError(f"{path}: <root>: expected a label-QA manifest with root and splits")
    return m


def check_min_boxes(manifest: dict, source: Path, split: str, floor: int, key: str) -> None:
    """Refuse a split with fewer than `floor` boxes: a model trained on nothing, or a test mAP
    of 0.0 over nothing, is an input error, not a result.

    Raises:
        DataError: naming the manifest, the split and the params key that sets the floor.
    """
    coco = manifest["splits"].get(split, {"annotations": [], "images": []})
    n = len(coco["annotations"])
    if n < floor:
        raise DataError(
            f"{source}: splits.{split}: {n} boxes on {len(coco['images'])} images, fewer than "
            f"params.yaml {key}={floor}; check the dataset (or what label QA dropped)"
        )
