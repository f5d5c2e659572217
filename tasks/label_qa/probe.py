"""Proof before a fix: each model-based rule is measured on the user's own train split each run.

For each rule, a copy of the (interim) train split gets known errors of that rule's kind, at
`label_qa.probe_rate` of its usable boxes: class swaps (`label_wrong_class`), shifted and scaled
boxes (`box_badly_placed`), dropped boxes (`box_missing`); the noise is
`tasks.data.inject_noise`'s, through `tasks.label_noise.inject`. The rule then runs on its copy
with the same out-of-sample detector predictions (the cross-fit's: no detector is retrained; the
box classifier is re-fitted on the copy's labels with the run's feature set). From the result:

- recall: the share of the injected errors of the rule's kinds that it flags;
- precision: of the label changes the rule's policy would make on the copy, the share that undo
  an injected error correctly (the original class; a box with IoU >= 0.5 to the original; an
  added box of the dropped box's class at IoU >= 0.5). Every other change counts as wrong,
  including one on a box that was not corrupted: the truth of the data's own labels is unknown,
  so a rule that rewrites many of them is not trusted. Where the data has real errors this
  under-estimates precision; a reviewer's decisions (`label_qa.decisions`) are the way to apply
  fixes the measurement cannot prove.

A rule changes labels only when its measured precision is at least `label_qa.min_fix_precision`
and at least `MIN_ERRORS` errors were injected for it; otherwise its findings are reported only.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from tasks.config import LabelNoiseCfg
from tasks.label_noise import inject
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import RULES, Hit, QaContext, Rule

log = logging.getLogger(__name__)
PROBE_NOISE = {  # rule -> the injected kinds it is meant to catch, as shares of probe_rate
    "label_wrong_class": {"class_swap": 1.0},
    "box_badly_placed": {"shift": 0.5, "scale": 0.5},
    "box_missing": {"drop": 1.0},
}
MIN_ERRORS = 10  # fewer injected errors than this measure nothing
RIGHT_IOU = 0.5  # a fixed or added box this close to the original one undoes the error


def corrupted_copy(ctx: QaContext, noise: LabelNoiseCfg, seed: int) -> tuple[dict, list[dict]]:
    """A deep copy of the interim train split with `noise` injected into its usable boxes (those
    no phase-1 error flagged); returns it and the injected ground truth."""
    coco = copy.deepcopy(ctx.interim["train"])
    usable = [a for a in coco["annotations"] if ("train", a["id"]) not in ctx.bad_annotations]
    others = [a for a in coco["annotations"] if ("train", a["id"]) in ctx.bad_annotations]
    target = {**coco, "annotations": usable}
    truth = inject(target, noise, np.random.default_rng([ctx.seed, 16, seed]), "train")
    coco["annotations"] = target["annotations"] + others
    return coco, truth


def _is_right(hit: Hit, kinds: tuple[str, ...], by_ann: dict, drops: dict) -> tuple:
    """(found, right): the id of the injected error of `kinds` the hit points at (None if
    none), and whether its fix undoes that error."""
    fix = hit.fix or {}
    if hit.annotation_id is None:  # an added box: the nearest dropped box of its image
        add = fix.get("add")
        cands = drops.get(hit.image_id, []) if "drop" in kinds else []
        if not add or not cands:
            return None, False
        originals = np.array([r["original"]["bbox"] for r in cands], float)
        iou = iou_matrix(np.array([add["bbox"]], float), originals)[0]
        best = int(np.argmax(iou))
        if iou[best] < RIGHT_IOU:
            return None, False
        r = cands[best]
        return r["annotation_id"], add["category_id"] == r["original"]["category_id"]
    r = by_ann.get(hit.annotation_id)
    if r is None or r["kind"] not in kinds:
        return None, False
    if r["kind"] == "class_swap":
        return r["annotation_id"], fix.get("category_id") == r["original"]["category_id"]
    if "bbox" not in fix:
        return r["annotation_id"], False
    iou = iou_matrix(np.array([fix["bbox"]], float), np.array([r["original"]["bbox"]], float))
    return r["annotation_id"], bool(iou[0, 0] >= RIGHT_IOU)


def _changes(policy: str, hit: Hit) -> bool:
    """Whether the policy would change a label for this hit (fix with a suggestion, or drop)."""
    if policy == "drop":
        return True
    return policy == "fix" and bool(hit.fix) and bool({"bbox", "category_id", "add"} & set(hit.fix))


def measure(ctx: QaContext) -> dict[str, dict]:
    """Measure every model-based (phase 2) rule on its own corrupted copy of the train split
    (only its kinds of error, so one rule's errors do not count against another; see the module
    docstring). Returns rule -> {injected, found, recall, changes, right, precision, acts,
    reason}; empty when train has no out-of-sample predictions."""
    if not ctx.predictions or "train" not in ctx.predictions:
        return {}
    out = {}
    for n, rule in enumerate(RULES.values()):
        if rule.phase != 2:
            continue
        policy = ctx.cfg.policy.get(rule.name, rule.policy)
        shares = PROBE_NOISE.get(rule.name, {})
        if not shares:
            row = dict.fromkeys(("injected", "found", "changes", "right"), 0)
            row |= {"recall": None, "precision": None}
        else:
            row = _measure_rule(ctx, rule, policy, shares, seed=n)
        kinds = tuple(shares)
        row["acts"], row["reason"] = _verdict(row, policy, ctx.cfg.min_fix_precision, kinds)
        out[rule.name] = row
        log.info("label_qa probe %s: %s", rule.name, row["reason"])
    return out


def _measure_rule(ctx: QaContext, rule: Rule, policy: str, shares: dict, seed: int) -> dict:
    rate = ctx.cfg.probe_rate
    noise = LabelNoiseCfg(**{k: rate * v for k, v in shares.items()})
    corrupted, truth = corrupted_copy(ctx, noise, seed)
    model = ctx.cfg.model
    if rule.name != "label_wrong_class":  # only that rule reads the box classifier
        model = model.model_copy(update={"box_classifier": False})
    probe = QaContext(
        ctx.cfg.model_copy(update={"model": model}),
        ctx.root,
        {"train": ctx.splits["train"]},
        bad_annotations=set(ctx.bad_annotations),
        bad_images=set(ctx.bad_images),
        predictions={"train": ctx.predictions["train"]},
        interim={"train": corrupted},
        crossfit_folds=ctx.crossfit_folds,
        seed=ctx.seed,
        box_features=ctx.box_features,
        box_trusted=ctx.box_trusted,
    )
    kinds = tuple(shares)
    by_ann = {r["annotation_id"]: r for r in truth if r["kind"] != "drop"}
    drops: dict[int, list[dict]] = {}
    for r in truth:
        if r["kind"] == "drop":
            drops.setdefault(r["image_id"], []).append(r)
    found: set = set()
    changes = right = 0
    for hit in rule.check(probe):
        if hit.split != "train":
            continue
        error, is_right = _is_right(hit, kinds, by_ann, drops)
        if error is not None:
            found.add(error)
        if _changes(policy, hit):
            changes += 1
            right += is_right
    return {
        "injected": len(truth),
        "found": len(found),
        "recall": round(len(found) / len(truth), 4) if truth else None,
        "changes": changes,
        "right": right,
        "precision": round(right / changes, 4) if changes else None,
    }


def _verdict(row: dict, policy: str, floor: float, kinds: tuple[str, ...]) -> tuple[bool, str]:
    if not kinds:
        return False, "reports only: no measurement exists for this rule"
    if row["injected"] < MIN_ERRORS:
        return False, (
            f"reports only: {row['injected']} errors injected (< {MIN_ERRORS}), too few boxes "
            "to measure its precision"
        )
    measured = (
        f"{row['right']} of {row['changes']} fixes right on injected errors, found "
        f"{row['found']} of {row['injected']}"
    )
    if policy == "keep":
        return False, f"reports only: policy keep ({measured})"
    if row["precision"] is None:
        return False, f"reports only: it proposed no fix on the injected errors ({measured})"
    if row["precision"] < floor:
        return False, (
            f"reports only: precision {row['precision']:.2f} < label_qa.min_fix_precision "
            f"{floor} ({measured})"
        )
    return True, f"acts: precision {row['precision']:.2f} >= {floor} ({measured})"
