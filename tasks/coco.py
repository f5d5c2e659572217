"""COCO detection files: schema (pydantic), safe paths, and the in-memory dataset `train` reads.

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

from tasks.errors import DataError


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


def load_coco(path: Path) -> CocoFile:
    """Parse and schema-check a COCO file. Raises DataError naming the file and the field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: <root>: expected a JSON object with images/annotations/categories"
        )
    try:
        return CocoFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise DataError(f"{path}: {loc}: {first['msg']}{more}") from e


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


def to_input(rgb: np.ndarray, input_size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize uint8 (H, W, 3) to the model input: uint8 (S, S, 3) and the (x, y) factors that map
    input pixels back to the original image. DetectionSet and the served model share this."""
    pixels = Image.fromarray(rgb)
    if pixels.size != (input_size, input_size):
        pixels = pixels.resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(pixels), (rgb.shape[1] / input_size, rgb.shape[0] / input_size)


class DetectionSet:
    """One split of a manifest, decoded into memory and resized to the model input.

    images: uint8 (N, S, S, 3); boxes[i]: float32 (M, 4) xyxy in input pixels; labels[i]: int64
    (M,) contiguous class indices; `scale[i]` maps input pixels back to the original image.
    """

    def __init__(self, manifest: dict, split: str, input_size: int) -> None:
        coco = manifest["splits"][split]
        root = Path(manifest["root"])
        self.coco = coco
        self.categories = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        cat_index = {cid: i for i, cid in enumerate(self.categories)}
        by_image: dict[int, list[dict]] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        self.ids, images, self.boxes, self.labels, self.scale = [], [], [], [], []
        for im in coco["images"]:
            pixels, _ = to_input(read_rgb(root / im["file_name"]), input_size)
            sx, sy = input_size / im["width"], input_size / im["height"]
            anns = by_image.get(im["id"], [])
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            self.ids.append(im["id"])
            images.append(pixels)
            self.boxes.append(xyxy * np.array([sx, sy, sx, sy], dtype=np.float32))
            self.labels.append(
                np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
            )
            self.scale.append((1 / sx, 1 / sy))
        self.images = (
            np.stack(images) if images else np.zeros((0, input_size, input_size, 3), np.uint8)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: np.ndarray | slice) -> np.ndarray:
        """float32 (B, 3, S, S) in [0, 1]."""
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
