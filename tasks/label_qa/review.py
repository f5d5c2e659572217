"""The review loop: findings out to a labelling tool, a reviewer's decisions back in.

Out (`export`, under `<out>/review/`): each split as COCO where every annotation with findings
carries `qa_findings` (id, rule, message, score, suggested fix, action) and every box the model
proposes to add is an extra annotation with `qa_proposed: true` (COCO importers such as CVAT,
Label Studio and FiftyOne keep or show extra fields); and `decisions.yaml`, a template listing
every finding that changes or proposes to change a label, each with `decision: pending`; and
the box-level ones as Label Studio tasks (`label_studio.py`: current labels as annotations,
proposed fixes as predictions), whose JSON export can be `label_qa.decisions` as it is.

In (`load_decisions`, `apply_decisions`): the file at `label_qa.decisions` (default
`label_qa/decisions.yaml`, a DVC dependency of the stage) with entries

    decisions:
      - {split: train, rule: label_wrong_class, annotation_id: 17, decision: reject}
      - {split: train, rule: box_missing, image_id: 4, decision: accept,
         fix: {add: {category_id: 2, bbox: [10, 12, 8, 9]}}}

`accept` applies the fix (the entry's `fix`, else this run's suggestion; a finding without one
drops the annotation); `reject` keeps the label as it is; `pending` does nothing. Decisions
override the model, the precision gate (`probe.py`) and the policy. A `box_missing` decision
matches this run's proposed box in that image at IoU >= 0.5. A malformed file, or an entry naming
an annotation or image that is not in the split, raises DataError naming the file and the entry
before anything is applied.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.harness.errors import DataError
from tasks.harness.io import write_json, write_text
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import RULES, SPLITS, Finding, QaContext
from tasks.label_qa.report import finding_row

log = logging.getLogger(__name__)
ADD_MATCH_IOU = 0.5  # a decision on a proposed box matches this run's proposal this close


class BoxFix(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category_id: int
    bbox: list[float] = Field(min_length=4, max_length=4)


class Fix(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category_id: int | None = None
    bbox: list[float] | None = Field(None, min_length=4, max_length=4)
    add: BoxFix | None = None
    model_box: list[float] | None = None  # shown to the reviewer; not applied


class Decision(BaseModel):
    """One reviewer decision on one finding."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["train", "val", "test"]
    rule: str = Field(description="the rule that made the finding")
    annotation_id: int | None = Field(None, description="the annotation it is about")
    image_id: int | None = Field(None, description="the image, for image-level findings")
    decision: Literal["accept", "reject", "pending"]
    fix: Fix | None = Field(None, description="the fix to apply on accept (default: this run's)")
    message: str = Field("", description="what the finding said (free text, not used)")


class DecisionsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decisions: list[Decision] = []


def _fix_dict(fix: Fix | None) -> dict | None:
    return None if fix is None else fix.model_dump(exclude_none=True)


def load_decisions(path: Path, ctx: QaContext) -> list[Decision]:
    """The decisions in `path` (none when it does not exist or is empty), checked against the
    parsed splits: YAML as above, or a `.json` Label Studio export (`label_studio.py`).

    Raises:
        DataError: not YAML (JSON), a schema error, an unknown rule, or an annotation / image /
            category that the split does not hold; the message names the file and the entry.
    """
    path = Path(path)
    if not path.exists():
        log.info("label_qa: no decisions file at %s", path)
        return []
    if path.suffix == ".json":  # a Label Studio export of review/label_studio.json's tasks
        from tasks.label_qa import label_studio

        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        decisions, where = label_studio.load_export(path, raw, ctx)
        check_decisions(decisions, ctx, where)
        return decisions
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if raw is None:
        return []
    try:
        parsed = DecisionsFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
        raise DataError(f"{path}: {loc or '<root>'}: {first['msg']}") from e
    where = [f"{path}: decisions[{i}]" for i in range(len(parsed.decisions))]
    check_decisions(parsed.decisions, ctx, where)
    return parsed.decisions


def check_decisions(decisions: list[Decision], ctx: QaContext, entries: list[str]) -> None:
    """Check each decision against the parsed splits; `entries[i]` names decision i's entry.

    Raises:
        DataError: an unknown rule, or an annotation / image / category the split does not hold.
    """
    for d, where in zip(decisions, entries, strict=True):
        if d.rule not in RULES:
            raise DataError(f"{where}: unknown rule {d.rule!r}; choose one of {', '.join(RULES)}")
        sd = ctx.splits[d.split]
        ann_ids = {a.id for a in sd.coco.annotations}
        cats = {c.id for c in sd.coco.categories}
        if d.annotation_id is None and d.image_id is None:
            raise DataError(f"{where}: names neither an annotation_id nor an image_id")
        if d.annotation_id is not None and d.annotation_id not in ann_ids:
            raise DataError(
                f"{where}: annotation {d.annotation_id} is not in {sd.source.name} (it no longer "
                "exists: remove the entry or review again)"
            )
        if d.image_id is not None and d.image_id not in sd.images:
            raise DataError(f"{where}: image {d.image_id} is not in {sd.source.name}")
        fix = d.fix
        for cat in (fix and fix.category_id, fix and fix.add and fix.add.category_id):
            if cat is not None and cat not in cats:
                raise DataError(f"{where}: fix: category_id {cat} is not in {sd.source.name}")
        if d.rule == "box_missing" and d.decision != "pending" and not (fix and fix.add):
            raise DataError(f"{where}: a box_missing decision needs fix.add (the proposed box)")


def _match(d: Decision, f: Finding) -> bool:
    if (d.split, d.rule) != (f.split, f.rule):
        return False
    if d.annotation_id is not None:
        return f.annotation_id == d.annotation_id
    if f.annotation_id is not None or f.image_id != d.image_id:
        return False
    if d.rule == "box_missing":
        mine = (f.fix or {}).get("add")
        theirs = d.fix.add.bbox
        return bool(mine) and iou_matrix(np.array([mine["bbox"]]), np.array([theirs]))[0, 0] >= (
            ADD_MATCH_IOU
        )
    return True


def apply_decisions(
    findings: list[Finding], decisions: list[Decision], ctx: QaContext, source: Path
) -> list[Finding]:
    """`findings` with every decision applied (see the module docstring); an accepted decision
    that matches no finding of this run becomes a finding of its own (it needs a fix).

    Raises:
        DataError: an accepted decision has no fix and this run proposes none.
    """
    out = list(findings)
    for i, d in enumerate(decisions):
        if d.decision == "pending":
            continue
        hits = [n for n, f in enumerate(out) if _match(d, f)]
        if d.decision == "reject":
            for n in hits:
                out[n] = replace(out[n], action="keep", note=f"rejected in review ({source})")
            continue
        for n in hits:
            fix = _fix_dict(d.fix) or out[n].fix
            action = "fix" if fix else ("drop" if out[n].annotation_id is not None else "keep")
            out[n] = replace(out[n], fix=fix, action=action, note=f"accepted in review ({source})")
        if hits:
            continue
        if d.fix is None:
            raise DataError(
                f"{source}: decisions[{i}]: accept, but this run proposes no fix for it and the "
                "entry gives none (add a fix)"
            )
        sd = ctx.splits[d.split]
        image_id = d.image_id
        if d.annotation_id is not None:
            image_id = next(a.image_id for a in sd.coco.annotations if a.id == d.annotation_id)
        out.append(
            Finding(
                d.split,
                image_id,
                d.annotation_id,
                d.rule,
                RULES[d.rule].severity,
                0.0,
                f"accepted in review: {d.message}".rstrip(": "),
                _fix_dict(d.fix),
                "fix",
                f"accepted in review ({source}); this run did not propose it",
            )
        )
    return out


def export(findings: list[Finding], ctx: QaContext, out_dir: Path) -> None:
    """Write `<out_dir>/<split>.json` (COCO with `qa_` fields), `<out_dir>/decisions.yaml`
    (the template a reviewer fills in; see the module docstring) and the same findings as
    Label Studio tasks (`label_studio.json` and its labelling config `label_studio.xml`)."""
    out_dir = Path(out_dir)
    for split in SPLITS:
        sd = ctx.splits[split]
        per_ann: dict[int, list[dict]] = {}
        proposed = []
        for f in findings:
            if f.split != split:
                continue
            if f.annotation_id is not None:
                per_ann.setdefault(f.annotation_id, []).append(finding_row(f))
            elif f.fix and "add" in f.fix:
                proposed.append(f)
        anns = []
        for a in sd.coco.annotations:
            row = a.model_dump()
            if a.id in per_ann:
                row["qa_findings"] = per_ann[a.id]
            anns.append(row)
        next_id = max((a.id for a in sd.coco.annotations), default=0) + 1
        for k, f in enumerate(proposed):
            box = f.fix["add"]
            anns.append(
                {
                    "id": next_id + k,
                    "image_id": f.image_id,
                    "category_id": box["category_id"],
                    "bbox": box["bbox"],
                    "area": box["bbox"][2] * box["bbox"][3],
                    "iscrowd": 0,
                    "qa_proposed": True,
                    "qa_findings": [finding_row(f)],
                }
            )
        write_json(
            out_dir / f"{split}.json",
            {
                "images": [im.model_dump() for im in sd.coco.images],
                "annotations": anns,
                "categories": [c.model_dump() for c in sd.coco.categories],
            },
        )
    entries = []
    for f in sorted(findings, key=lambda f: (f.split, f.rule, f.image_id or 0, f.key)):
        if f.image_id is None or not (f.fix or f.action != "keep"):
            continue
        entry = {"split": f.split, "rule": f.rule}
        entry |= {"annotation_id": f.annotation_id} if f.annotation_id is not None else {}
        entry |= {"image_id": f.image_id} if f.annotation_id is None else {}
        entry |= {"decision": "pending", "message": f"{f.message} [{f.action}]"}
        if f.fix:
            entry["fix"] = f.fix
        entries.append(entry)
    header = (
        "# Label QA findings for review: set each decision to accept or reject, save the file as\n"
        "# label_qa.decisions (default label_qa/decisions.yaml) and re-run the stage.\n"
    )
    write_text(
        out_dir / "decisions.yaml",
        header + yaml.safe_dump({"decisions": entries}, sort_keys=False, width=100),
    )
    from tasks.label_qa import label_studio  # it builds on this module's Decision

    label_studio.export(findings, ctx, out_dir)
