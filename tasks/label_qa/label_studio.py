"""Label Studio round trip: findings out as import-ready tasks, a reviewer's export back in.

Out (`export`, `<out>/review/label_studio.json` and `label_studio.xml`): one task per image with a
box-level finding that changes or proposes to change a label (the entries of decisions.yaml
without the image-level ones), in Label Studio's JSON task format
(https://labelstud.io/guide/task_format, https://labelstud.io/guide/predictions):

- `data.image`: the image as Label Studio's local-files URL (`/data/local-files/?d=<path>`,
  the path relative to the dataset root: start Label Studio with
  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at
  that root, or rewrite the prefix for your storage); `data.split` / `data.image_id` too;
- `annotations`: one annotation holding the image's current labels;
- `predictions`: one prediction holding the labels with every proposed fix applied (relabelled,
  moved, added boxes; dropped boxes left out), `model_version` "shrinkflow label_qa";
- `meta.findings`: the finding ids (`Finding.key`) with their rule, box, class and fix, which
  is what the read-back needs.
Boxes are `rectanglelabels` regions in percent of the image size (`x`, `y` the top-left
corner), with `original_width` / `original_height`; labels are the category names, and
`label_studio.xml` is the labelling config they fit (`RectangleLabels` "label" on `Image`
"image").

In (`load_export`): Label Studio's JSON export of those tasks. For each task, its last
annotation that was not skipped (`was_cancelled`) is the reviewer's; each finding of the task
is accepted when that annotation keeps its proposal (a region at IoU >= 0.5 with the proposed
box that carries the proposed class; for a proposed drop: no region of that class left at the
box), rejected otherwise, including a task left as imported (it still holds the labels as they
were: export only the tasks you reviewed); a task without such an annotation is pending.
An accepted fix takes the reviewer's box. The result is the same `review.Decision`s as
decisions.yaml: point `label_qa.decisions` at the export (a `.json` file) and re-run.

A malformed export raises DataError naming the file and the entry (`[3].meta.findings[0]...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.harness.errors import DataError
from tasks.harness.io import write_json, write_text
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import Finding, QaContext
from tasks.label_qa.review import Decision, Fix

FROM_NAME, TO_NAME = "label", "image"
MODEL_VERSION = "shrinkflow label_qa"
KEEP_IOU = 0.5  # a reviewer's region this close to the proposed box keeps the proposal
URL_PREFIX = "/data/local-files/?d="


def _region(rid: str, box: list[float], name: str, size: tuple[int, int]) -> dict:
    w, h = size
    x, y, bw, bh = box
    return {
        "id": rid,
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "x": 100 * x / w,
            "y": 100 * y / h,
            "width": 100 * bw / w,
            "height": 100 * bh / h,
            "rotation": 0,
            "rectanglelabels": [name],
        },
    }


def _reviewable(f: Finding) -> bool:
    """A box-level finding that changes or proposes to change a label."""
    if f.image_id is None or not (f.fix or f.action != "keep"):
        return False
    return f.annotation_id is not None or "add" in (f.fix or {})


def export(findings: list[Finding], ctx: QaContext, out_dir: Path) -> int:
    """Write `<out_dir>/label_studio.json` (the tasks) and `<out_dir>/label_studio.xml` (the
    labelling config); returns the number of tasks."""
    out_dir = Path(out_dir)
    per_image: dict[tuple[str, int], list[Finding]] = {}
    for f in sorted(findings, key=lambda f: (f.split, f.image_id or 0, f.rule, f.key)):
        sd = ctx.splits[f.split]
        known = f.annotation_id is None or any(
            a.id == f.annotation_id for a in sd.anns_by_image.get(f.image_id, [])
        )
        if _reviewable(f) and f.image_id in sd.images and known:  # not an orphan annotation
            per_image.setdefault((f.split, f.image_id), []).append(f)
    root = Path(ctx.root).resolve()
    tasks = []
    for (split, image_id), fs in per_image.items():
        sd = ctx.splits[split]
        im = sd.images[image_id]
        size = (im.width, im.height)
        name = sd.category_name
        current = [
            _region(f"a{a.id}", list(a.bbox), name(a.category_id), size)
            for a in sd.anns_by_image.get(image_id, [])
        ]
        proposed = {r["id"]: r for r in current}
        meta = []
        for k, f in enumerate(fs):
            fix = f.fix or {}
            row = {"id": f.key, "rule": f.rule, "message": f.message, "action": f.action}
            if f.annotation_id is not None:
                ann = next(a for a in sd.anns_by_image[image_id] if a.id == f.annotation_id)
                row |= {
                    "annotation_id": ann.id,
                    "bbox": list(ann.bbox),
                    "label": name(ann.category_id),
                }
                rid = f"a{ann.id}"
                if rid not in proposed:
                    continue  # another finding already proposes to drop it
                if not fix:
                    proposed.pop(rid)  # a proposed drop
                else:
                    label = name(fix.get("category_id", ann.category_id))
                    box = fix.get("bbox", list(ann.bbox))
                    proposed[rid] = _region(rid, box, label, size)
            else:
                add = fix["add"]
                row |= {"bbox": add["bbox"], "label": name(add["category_id"])}
                proposed[f"p{k}"] = _region(f"p{k}", add["bbox"], name(add["category_id"]), size)
            row["fix"] = {key: v for key, v in fix.items() if key != "model_box"} or None
            meta.append(row)
        tasks.append(
            {
                "data": {
                    "image": URL_PREFIX + sd.paths[image_id].relative_to(root).as_posix(),
                    "split": split,
                    "image_id": image_id,
                },
                "meta": {"split": split, "image_id": image_id, "findings": meta},
                "annotations": [{"result": current}],
                "predictions": [
                    {
                        "model_version": MODEL_VERSION,
                        "score": min(f.score for f in fs),
                        "result": list(proposed.values()),
                    }
                ],
            }
        )
    write_json(out_dir / "label_studio.json", tasks)
    names = sorted({c.name for sd in ctx.splits.values() for c in sd.coco.categories})
    labels = "".join(f'    <Label value="{n}"/>\n' for n in names)
    write_text(
        out_dir / "label_studio.xml",
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}'
        "  </RectangleLabels>\n</View>\n",
    )
    return len(tasks)


# --- the reviewer's export (only the fields read; Label Studio adds many more) ---------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class LsValue(_Open):
    x: float
    y: float
    width: float = Field(ge=0)
    height: float = Field(ge=0)
    rectanglelabels: list[str] = Field(min_length=1)


class LsRegion(_Open):
    type: str
    original_width: int | None = Field(None, gt=0)
    original_height: int | None = Field(None, gt=0)
    value: dict


class LsAnnotation(_Open):
    result: list[LsRegion] = []
    was_cancelled: bool = False


class LsFinding(_Open):
    id: str
    rule: str
    annotation_id: int | None = None
    bbox: list[float] = Field(min_length=4, max_length=4)
    label: str
    fix: Fix | None = None


class LsMeta(_Open):
    split: Literal["train", "val", "test"]
    image_id: int
    findings: list[LsFinding]


class LsTask(_Open):
    meta: LsMeta
    annotations: list[LsAnnotation] = []


def _loc(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _boxes(ann: LsAnnotation, size: tuple[int, int], where: str) -> list[tuple[str, list]]:
    """The annotation's rectangles as (label, [x, y, w, h] px)."""
    out = []
    for k, r in enumerate(ann.result):
        if r.type != "rectanglelabels":
            continue
        try:
            v = LsValue.model_validate(r.value)
        except ValidationError as e:
            first = e.errors()[0]
            raise DataError(
                f"{where}.result[{k}].value.{_loc(first['loc'])}: {first['msg']}"
            ) from e
        w, h = r.original_width or size[0], r.original_height or size[1]
        box = [v.x * w / 100, v.y * h / 100, v.width * w / 100, v.height * h / 100]
        out.append((v.rectanglelabels[0], box))
    return out


def _kept(regions: list[tuple[str, list]], label: str, box: list[float]) -> list | None:
    """The reviewer's region of `label` overlapping `box` most at IoU >= KEEP_IOU, or None."""
    mine = [b for n, b in regions if n == label]
    if not mine:
        return None
    iou = iou_matrix(np.array([box], float), np.array(mine, float))[0]
    best = int(np.argmax(iou))
    return [round(float(v), 2) for v in mine[best]] if iou[best] >= KEEP_IOU else None


def _decide(f: LsFinding, regions: list, split: str, image_id: int, cat_of: dict) -> Decision:
    fix = f.fix
    base = {"split": split, "rule": f.rule, "message": f"Label Studio review of {f.id}"}
    if f.annotation_id is not None:
        base["annotation_id"] = f.annotation_id
    else:
        base["image_id"] = image_id
    if fix is None:  # a proposed drop: kept when the box is gone
        gone = _kept(regions, f.label, f.bbox) is None
        return Decision(**base, decision="accept" if gone else "reject")
    if fix.add is not None:
        label = next(n for n, c in cat_of.items() if c == fix.add.category_id)
        box = _kept(regions, label, fix.add.bbox)
        if box is None:
            return Decision(**base, decision="reject", fix=fix)
        return Decision(
            **base, decision="accept", fix={"add": {**fix.add.model_dump(), "bbox": box}}
        )
    label = f.label
    if fix.category_id is not None:
        label = next(n for n, c in cat_of.items() if c == fix.category_id)
    box = _kept(regions, label, fix.bbox or f.bbox)
    if box is None:
        return Decision(**base, decision="reject")
    if fix.bbox is not None:  # a move: the reviewer's box must sit nearer the proposal
        near = iou_matrix(np.array([box], float), np.array([fix.bbox, f.bbox], float))[0]
        if near[0] < near[1]:
            return Decision(**base, decision="reject")
    accepted = {"category_id": fix.category_id} if fix.category_id is not None else {}
    if fix.bbox is not None:
        accepted["bbox"] = box
    return Decision(**base, decision="accept", fix=accepted)


def load_export(path: Path, raw: object, ctx: QaContext) -> tuple[list[Decision], list[str]]:
    """The decisions in a Label Studio JSON export (`raw`, parsed from `path`; see the module
    docstring), with where each came from (`<path>: [i].meta.findings[j]`), for the checks in
    `review.load_decisions`.

    Raises:
        DataError: not a list of tasks, a task or region that does not parse, or a label name
            that is not a category of the task's split; the message names the entry.
    """
    if not isinstance(raw, list):
        raise DataError(
            f"{path}: expected a Label Studio JSON export (a list of tasks), found "
            f"{type(raw).__name__}"
        )
    decisions, where = [], []
    for i, item in enumerate(raw):
        try:
            task = LsTask.model_validate(item)
        except ValidationError as e:
            first = e.errors()[0]
            raise DataError(f"{path}: [{i}].{_loc(first['loc'])}: {first['msg']}") from e
        split, image_id = task.meta.split, task.meta.image_id
        sd = ctx.splits[split]
        if image_id not in sd.images:
            raise DataError(
                f"{path}: [{i}].meta.image_id: image {image_id} is not in {sd.source.name}"
            )
        cat_of = {c.name: c.id for c in sd.coco.categories}
        done = [(j, a) for j, a in enumerate(task.annotations) if not a.was_cancelled]
        if not done:
            continue  # not reviewed: pending
        j, ann = done[-1]
        im = sd.images[image_id]
        regions = _boxes(ann, (im.width, im.height), f"{path}: [{i}].annotations[{j}]")
        for k, (name, _) in enumerate(regions):
            if name not in cat_of:
                raise DataError(
                    f"{path}: [{i}].annotations[{j}]: region {k} is labelled {name!r}, not a "
                    f"category of {sd.source.name} ({', '.join(cat_of)})"
                )
        for k, f in enumerate(task.meta.findings):
            here = f"{path}: [{i}].meta.findings[{k}]"
            for cat in (f.fix and f.fix.category_id, f.fix and f.fix.add and f.fix.add.category_id):
                if cat is not None and cat not in cat_of.values():
                    raise DataError(f"{here}.fix: category_id {cat} is not in {sd.source.name}")
            if f.label not in cat_of:
                raise DataError(f"{here}.label: {f.label!r} is not a category of {sd.source.name}")
            decisions.append(_decide(f, regions, split, image_id, cat_of))
            where.append(here)
    return decisions, where
