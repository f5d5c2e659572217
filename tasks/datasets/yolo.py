"""YOLO, the Ultralytics layout: `data.yaml` (path, train, val, test, names), images/, labels/.

Each image's label file is the image path with its last `images` folder replaced by `labels` and
the suffix by `.txt`; a line is `class cx cy w h` normalised to [0, 1] (or `class x1 y1 x2 y2 ...`,
a polygon, boxed). An image with no label file is a negative (counted); a label file with no
image, a line of the wrong length, a class id outside `names` are errors. Coordinates outside
[0, 1] are kept: label QA reports the box and clips it by policy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from tasks.datasets.common import (
    IMAGE_SUFFIXES,
    POOL,
    SPLITS,
    Source,
    box_entry,
    image_size,
    mismatch,
    relative,
)
from tasks.harness.config import DatasetCfg
from tasks.harness.errors import DataError

log = logging.getLogger(__name__)


def label_path(image: Path) -> Path:
    """Ultralytics' img2label_paths: the last `/images/` becomes `/labels/`, suffix `.txt`."""
    text = image.as_posix()
    if "/images/" in text:
        head, tail = text.rsplit("/images/", 1)
        text = f"{head}/labels/{tail}"
    return Path(text).with_suffix(".txt")


def _names(data: dict, source: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: names: keys must be class ids 0..n-1") from e
        if keys != list(range(len(keys))):
            raise DataError(f"{source}: names: keys must be class ids 0..n-1, got {keys}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise DataError(f"{source}: names: missing or empty (a list of class names)")


def _images(entry, base: Path, source: Path, field: str) -> list[Path]:
    """The image files one data.yaml entry names: folders, list files, or a list of either."""
    out: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else p.parent / q)
        else:
            raise DataError(f"{source}: {field}: {item} is neither a folder nor a .txt list")
    return out


def _boxes(path: Path, root: Path, n_names: int, w: int, h: int) -> list[tuple[int, list]]:
    """(class index, [x, y, w, h] px) per line of one label file."""
    rel = root / relative(root, path, path, "label file")  # as the user names the folder
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            nums = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{rel}: line {no}: not a number in {line.strip()!r}") from None
        if len(nums) != 5 and (len(nums) < 7 or len(nums) % 2 == 0):
            raise DataError(
                f"{rel}: line {no}: expected 5 numbers (class cx cy w h) or a polygon "
                f"(class x1 y1 x2 y2 x3 y3 ...), found {len(nums)}"
            )
        cls = nums[0]
        if cls != int(cls) or not 0 <= cls < n_names:
            raise DataError(
                f"{rel}: line {no}: class {parts[0]}: not a class id of data.yaml names "
                f"(0..{n_names - 1})"
            )
        if len(nums) == 5:
            cx, cy, bw, bh = nums[1:]
            x0, y0 = cx - bw / 2, cy - bh / 2
        else:
            xs, ys = nums[1::2], nums[2::2]
            x0, y0, bw, bh = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
        out.append((int(cls), [x0 * w, y0 * h, bw * w, bh * h]))
    return out


def read_yolo(root: Path, cfg: DatasetCfg) -> Source:
    """The Ultralytics dataset under `root` (see the module docstring)."""
    yamls = [root / "data.yaml"] if (root / "data.yaml").is_file() else sorted(root.glob("*.yaml"))
    if len(yamls) != 1:
        raise mismatch("yolo", root, "one data.yaml (path, train, val, test, names)")
    source = yamls[0]
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{source}: <root>: expected a mapping with path/train/val/test/names")
    names = _names(data, source)
    base = Path(str(data.get("path") or "."))
    base = base if base.is_absolute() else root / base
    relative(root, base, source, "path")  # must stay inside the dataset folder (DVC tracks it)
    present = [s for s in SPLITS if data.get(s)]
    if "train" not in present:
        raise DataError(f"{source}: train: missing (the training images folder or list)")
    use = SPLITS if len(present) == 3 else (POOL,)
    if use == (POOL,) and not cfg.split:
        raise DataError(
            f"{source}: {'/'.join(s for s in SPLITS if s not in present)}: missing; name "
            "train, val and test, or set dataset.split to split the images"
        )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    splits: dict[str, dict] = {s: {"images": [], "annotations": []} for s in use}
    expected_labels: set[Path] = set()
    negatives = 0
    for s in present:
        target = splits[s if use == SPLITS else POOL]
        for img in _images(data[s], base, source, s):
            img_id = len(target["images"]) + 1
            size = image_size(img)
            w, h = size or (1, 1)  # unreadable: label QA reports it; boxes stay normalised
            target["images"].append(
                {
                    "id": img_id,
                    "file_name": relative(root, img, source, s),
                    "width": w,
                    "height": h,
                }
            )
            lbl = label_path(img.resolve())
            expected_labels.add(lbl)
            if not lbl.is_file():
                negatives += 1
                continue
            for cls, xywh in _boxes(lbl, root, len(names), w, h):
                ann_id = len(target["annotations"]) + 1
                target["annotations"].append(box_entry(ann_id, img_id, cls + 1, xywh))
    orphans = sorted(
        p
        for p in root.resolve().rglob("*.txt")
        if "labels" in p.relative_to(root.resolve()).parts[:-1]
        and p.name != "classes.txt"
        and p not in expected_labels
    )
    if orphans:
        rel = root / orphans[0].relative_to(root.resolve())
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise DataError(f"{rel}: label file: no image in {source.name}'s splits has it{more}")
    if negatives:
        log.warning("yolo: %d image(s) have no label file: kept as negatives", negatives)
    files = [source, *sorted(p for p in expected_labels if p.is_file())]
    return Source("yolo", root, categories, splits, files, {"images_without_label_file": negatives})
