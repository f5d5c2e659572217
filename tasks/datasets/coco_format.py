"""COCO: `{train,val,test}.json` in the dataset folder, or one file (`dataset.annotations`).

`file_name` is taken relative to the dataset folder, else to its `images/` folder (the layout of
CVAT / FiftyOne exports). Category ids are kept.
"""

from __future__ import annotations

from pathlib import Path

from tasks.datasets.coco import CocoFile, load_coco, resolve_image
from tasks.datasets.common import POOL, SPLITS, Source, mismatch
from tasks.harness.config import DatasetCfg
from tasks.harness.errors import DataError


def _split(root: Path, coco: CocoFile, source: Path) -> dict:
    images = []
    for i, im in enumerate(coco.images):
        field = f"images[{i}].file_name"
        path = resolve_image(root, im.file_name, source, field)
        if not path.exists():
            alt = resolve_image(root / "images", im.file_name, source, field)
            path = alt if alt.exists() else path
        row = im.model_dump()
        row["file_name"] = path.relative_to(Path(root).resolve()).as_posix()
        images.append(row)
    return {"images": images, "annotations": [a.model_dump() for a in coco.annotations]}


def read_coco(root: Path, cfg: DatasetCfg) -> Source:
    """The COCO files under `root` (see the module docstring)."""
    if cfg.annotations:
        source = root / cfg.annotations
        if not source.is_file():
            raise DataError(f"{source}: dataset.annotations: file not found")
        coco = load_coco(source)
        return Source(
            "coco",
            root,
            [c.model_dump() for c in coco.categories],
            {POOL: _split(root, coco, source)},
            [source],
        )
    missing = [s for s in SPLITS if not (root / f"{s}.json").is_file()]
    if missing:
        if len(missing) == len(SPLITS):
            raise mismatch(
                "coco", root, "train.json, val.json and test.json (or dataset.annotations)"
            )
        raise DataError(
            f"{root}: dataset.format coco: {', '.join(f'{s}.json' for s in missing)} missing "
            "(give all three splits, or one file as dataset.annotations with dataset.split)"
        )
    files = {s: load_coco(root / f"{s}.json") for s in SPLITS}
    categories = [c.model_dump() for c in files["train"].categories]
    names = sorted((c["id"], c["name"]) for c in categories)
    for s in ("val", "test"):
        if sorted((c.id, c.name) for c in files[s].categories) != names:
            raise DataError(f"{root / f'{s}.json'}: categories: differ from train.json's")
    splits = {s: _split(root, files[s], root / f"{s}.json") for s in SPLITS}
    return Source("coco", root, categories, splits, [root / f"{s}.json" for s in SPLITS])
