"""Pascal VOC: Annotations/*.xml, JPEGImages/, ImageSets/Main/{train,val,test}.txt.

Boxes are 1-based inclusive pixel corners (xmin..xmax), as in the VOC devkit: COCO x = xmin - 1,
w = xmax - xmin + 1. `difficult` objects become COCO `iscrowd: 1`, the ignore regions of
evaluation. Class ids follow `dataset.classes` (default: the 20 VOC classes), starting at 1.
Without the three ImageSets lists every XML is one pool, split by `dataset.split`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tasks.datasets.common import POOL, SPLITS, Source, box_entry, image_size, mismatch, relative
from tasks.harness.config import DatasetCfg
from tasks.harness.errors import DataError


def _number(node: ET.Element, tag: str, rel: str, where: str) -> float:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{rel}: {where}.{tag}: missing")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{rel}: {where}.{tag}: {text.strip()!r} is not a number") from None


def _image_for(root: Path, stem: str, tree: ET.Element) -> Path:
    name = (tree.findtext("filename") or "").strip()
    if name and (root / "JPEGImages" / name).is_file():
        return root / "JPEGImages" / name
    found = sorted((root / "JPEGImages").glob(f"{stem}.*"))
    return found[0] if found else root / "JPEGImages" / (name or f"{stem}.jpg")


def _parse(root: Path, stem: str, classes: dict[str, int], img_id: int, split: dict) -> None:
    xml = root / "Annotations" / f"{stem}.xml"
    rel = str(xml)
    if not xml.is_file():
        raise DataError(f"{rel}: file not found (listed in ImageSets/Main)")
    try:
        tree = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise DataError(f"{rel}: not valid XML: {e}") from None
    image = _image_for(root, stem, tree)
    actual = image_size(image)
    size = tree.find("size")
    if size is not None and actual is not None:
        stated = (
            int(_number(size, "width", rel, "size")),
            int(_number(size, "height", rel, "size")),
        )
        if stated != actual:
            raise DataError(
                f"{rel}: size: {stated[0]}x{stated[1]} but {relative(root, image, xml, 'filename')}"
                f" is {actual[0]}x{actual[1]}"
            )
    w, h = actual or (1, 1)  # unreadable: label QA reports it
    split["images"].append(
        {"id": img_id, "file_name": relative(root, image, xml, "filename"), "width": w, "height": h}
    )
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise DataError(
                f"{rel}: object[{k}].name: unknown class {name!r} "
                f"(dataset.classes: {', '.join(classes)})"
            )
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{rel}: object[{k}].bndbox: missing")
        x0, y0, x1, y1 = (
            _number(box, t, rel, f"object[{k}].bndbox") for t in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult = (
            int(_number(obj, "difficult", rel, f"object[{k}]"))
            if obj.find("difficult") is not None
            else 0
        )
        ann = box_entry(
            len(split["annotations"]) + 1,
            img_id,
            classes[name],
            (x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1),
            iscrowd=difficult,
        )
        if difficult:
            ann["difficult"] = 1
        split["annotations"].append(ann)


def read_voc(root: Path, cfg: DatasetCfg) -> Source:
    """The VOC dataset under `root` (see the module docstring)."""
    if not (root / "Annotations").is_dir():
        raise mismatch("voc", root, "Annotations/*.xml, JPEGImages/ and ImageSets/Main/*.txt")
    names = cfg.voc_classes()
    classes = {n: i + 1 for i, n in enumerate(names)}
    lists = {s: root / "ImageSets" / "Main" / f"{s}.txt" for s in SPLITS}
    files: list[Path] = []
    if all(p.is_file() for p in lists.values()):
        stems = {
            s: [ln.split()[0] for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for s, p in lists.items()
        }
        files += lists.values()
    elif cfg.split:
        stems = {POOL: sorted(p.stem for p in (root / "Annotations").glob("*.xml"))}
    else:
        have = sorted(p.name for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DataError(
            f"{root / 'ImageSets/Main'}: expected train.txt, val.txt and test.txt "
            f"(found: {', '.join(have) or 'none'}); or set dataset.split to split "
            "Annotations/*.xml"
        )
    splits = {}
    for s, ids in stems.items():
        splits[s] = {"images": [], "annotations": []}
        for i, stem in enumerate(ids, 1):
            _parse(root, stem, classes, i, splits[s])
            files.append(root / "Annotations" / f"{stem}.xml")
    categories = [{"id": i, "name": n} for n, i in classes.items()]
    return Source("voc", root, categories, splits, files)
