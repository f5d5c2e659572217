"""Proof before a fix: each model-based rule is measured on the user's own train split each run.

Two passes per rule. Pass 0 is the rule's own run on the (interim) train split as given: the
changes its policy would make there (`base`). Then a copy of the split gets pass 0's changes
applied, so it is no noisier than the data as the rule would leave it, and known errors of the
rule's kind are injected into the usable boxes pass 0 left alone, at `label_qa.probe_rate` of
the usable boxes: class swaps (`label_wrong_class`), shifted and scaled boxes
(`box_badly_placed`), dropped boxes (`box_missing`); the noise is
`tasks.datasets.digits.inject_noise`'s, through `tasks.datasets.label_noise.inject`. The rule
runs on its copy with the run's out-of-sample evidence: the cross-fit detector's predictions and
the box classifier's out-of-fold probabilities, neither re-fitted (a box's out-of-sample
evidence does not read its own label, so an injected error is judged by the same evidence,
learnt from the same labels, as an error of the data's own would be). The first design injected
into the split as given and re-fitted the box classifier there: the copy held the data's own
errors beside the injected ones (15% swaps where the data has 5%), the classifier learnt from
both, injections landing on an own error made the wrong label the "truth", and on the noisy
digits the measured precision was 0.87 where the rule's real precision is 0.96. From the copy:

- recall: the share of the injected errors of the rule's kinds that it flags;
- right on injected: of the label changes it makes on injected boxes, those that undo the
  error (the original class; a box with IoU >= 0.5 to the original; an added box of the
  dropped box's class at IoU >= 0.5);
- collateral: every other change on the copy. Pass 0's changes are already applied there, so
  these were caused by the injection (or are a change of mind on a box pass 0 fixed): wrong.

Pass 0's own changes are the data's own errors and the rule's standing false alarms, mixed,
and no measurement can split them box by box: a model that misreads k% of the boxes and data
with k% wrong labels read by a right model give the same findings on the split and on every
corrupted copy of it. So they are credited as right only up to two upper bounds on how many
can be the data's own errors:
    - prior bound: the labels are wrong at most at `label_qa.max_own_error_rate` per error
      kind of the rule (box_badly_placed has two: shift, scale), so at most that share of the
      usable boxes, plus two binomial standard errors (a split is a finite draw), carry one,
      and the rule finds them at its measured recall; base changes beyond recall x that many
      are false alarms.
      Curated datasets are reported with a few % wrong labels (Northcutt et al., "Pervasive
      Label Errors in Test Sets", 2021: 3.4% on average over ten benchmarks); a rule that
      rewrites far more than that on its own is not believed.
    - score bound (mixture proportion, Blanchard et al. 2010; Scott 2015): assuming the data's
      own errors score like the injected ones (lower = more surely wrong), at every score u
      the share of base changes scoring <= u is at least (their real-error share) x (the share
      of changes on injected errors scoring <= u); the ratio at the injected scores' median
      and upper quartile, with two binomial standard errors of slack for small samples,
      bounds that share. False alarms that score unlike real errors (clutter read as an
      object, weak evidence) are not credited. The bound is only as good as the score's
      ranking: box_missing scores an added box by 1 - its prediction's calibrated probability
      (ObjectLab's overlooked score is ~0 for every confident unlabelled prediction, so with it
      clutter read as an object scored like a dropped object and was credited).
The credited changes are then scaled by the share of the rule's changes on injected errors that
were right (an own error found is fixed as well as an injected one: an added box of the wrong
class, a move onto the wrong object, is still wrong).

precision = credited / base changes: the expected share of right changes among those the rule
would make on the user's split, the only ones it applies. With no base change it is the
injected-error figure, right / (changes on injected + collateral): how right a change would be.
The copy's changes are evidence, not what gets applied: pooled with the base changes
(`precision_pooled`, the first design), hundreds of right fixes of injected errors outvoted a
handful of false alarms, and data with no errors of its own had correct labels rewritten.
Beside it the report keeps `precision_injected` and `precision_conservative` (the pooled
figure with every base change wrong). On data with no errors of its own every base
change is a false alarm; unless they score like injected errors and fit the prior, they are
not credited and the rule reports only.

A rule changes labels only when its measured precision is at least `label_qa.min_fix_precision`
and at least `MIN_ERRORS` errors were injected for it and it proposed fixes on that many;
otherwise its findings are reported only.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from tasks.datasets.label_noise import inject
from tasks.harness.config import LabelNoiseCfg
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import RULES, Hit, QaContext, Rule, finding_score

log = logging.getLogger(__name__)
PROBE_NOISE = {  # rule -> the injected kinds it is meant to catch, as shares of probe_rate
    "label_wrong_class": {"class_swap": 1.0},
    "box_badly_placed": {"shift": 0.5, "scale": 0.5},
    "box_missing": {"drop": 1.0},
}
MIN_ERRORS = 10  # fewer injected errors than this measure nothing
RIGHT_IOU = 0.5  # a fixed or added box this close to the original one undoes the error
QUANTILES = (0.5, 0.75)  # of the injected-error scores, for the score bound


def corrupted_copy(
    ctx: QaContext, noise: LabelNoiseCfg, seed: int, base: tuple[dict, dict] | None = None
) -> tuple[dict, list[dict]]:
    """A deep copy of the interim train split with pass 0's changes (`base`, from
    `_base_changes`) applied, then `noise` injected into the usable boxes (those no phase-1
    error flagged) that pass 0 left alone; returns it and the injected ground truth. Applying
    pass 0 first keeps the copy no noisier than the data as the rule would leave it, and keeps
    the injection off boxes whose label the rule already doubts."""
    coco = copy.deepcopy(ctx.interim["train"])
    on_ann, adds = base or ({}, {})
    kept, touched = [], []
    for a in coco["annotations"]:
        if a["id"] not in on_ann:
            kept.append(a)
            continue
        fix = on_ann[a["id"]]
        if fix is None:  # policy drop: pass 0 removes the box
            continue
        a.update({k: v for k, v in fix.items() if k in ("bbox", "category_id")})
        a["area"] = a["bbox"][2] * a["bbox"][3]
        touched.append(a)
    next_id = max((a["id"] for a in coco["annotations"]), default=0) + 1
    for image_id in sorted(adds):
        for box in adds[image_id]:
            touched.append(
                {
                    "id": next_id,
                    "image_id": image_id,
                    "category_id": box["category_id"],
                    "bbox": list(box["bbox"]),
                    "area": box["bbox"][2] * box["bbox"][3],
                    "iscrowd": 0,
                }
            )
            next_id += 1
    usable = [a for a in kept if ("train", a["id"]) not in ctx.bad_annotations]
    others = [a for a in kept if ("train", a["id"]) in ctx.bad_annotations]
    target = {**coco, "annotations": usable}
    truth = inject(target, noise, np.random.default_rng([ctx.seed, 16, seed]), "train")
    coco["annotations"] = target["annotations"] + others + touched
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


def measure(ctx: QaContext, findings: list | None = None) -> dict[str, dict]:
    """Measure every model-based (phase 2) rule on its own corrupted copy of the train split
    (only its kinds of error, so one rule's errors do not count against another; see the module
    docstring). `findings` are the rules' findings on the user's split (pass 0; none: every
    change on the copy outside the injection counts as collateral, i.e. wrong). Returns rule ->
    {injected, found, recall, changes, right, base, credited, collateral, precision,
    precision_injected, precision_conservative, own_errors_found_at_most,
    error_like_share, acts, reason};
    empty when train has no out-of-sample predictions."""
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
            base = [f for f in findings or [] if f.rule == rule.name and f.split == "train"]
            row = _measure_rule(ctx, rule, policy, shares, seed=n, base=base)
        kinds = tuple(shares)
        row["acts"], row["reason"] = _verdict(row, policy, ctx.cfg.min_fix_precision, kinds)
        out[rule.name] = row
        log.info("label_qa probe %s: %s", rule.name, row["reason"])
    return out


def _base_changes(policy: str, base: list) -> tuple[dict, dict]:
    """Pass 0's label changes: annotation id -> fix (None: the box is dropped), and image id ->
    [added boxes]."""
    on_ann: dict[int, dict | None] = {}
    adds: dict[int, list[dict]] = {}
    for f in base:
        if not _changes(policy, f):
            continue
        if f.annotation_id is not None:
            on_ann[f.annotation_id] = (f.fix or {}) if policy == "fix" else None
        elif policy == "fix" and "add" in (f.fix or {}):
            adds.setdefault(f.image_id, []).append(f.fix["add"])
    return on_ann, adds


def own_errors_at_most(rate: float, boxes: int) -> float:
    """How many of `boxes` can carry the data's own errors when its labels are wrong at most at
    `rate`: the expected count plus two binomial standard errors (the rate is the labelling
    process's; a split is a finite draw of it, so its count can sit above rate x boxes)."""
    return rate * boxes + 2 * np.sqrt(boxes * rate * (1 - rate))


def error_like_share(base_scores: list[float], injected_scores: list[float]) -> float:
    """An upper bound on the share of the base changes that are real errors, from their scores
    (lower = more surely wrong): min over u at the injected scores' QUANTILES of
    (F_base(u) + 2 se) / F_injected(u), capped at 1, with se the binomial standard error of
    F_base(u) (see the module docstring). 1 when there is no base change; 0 when the rule changed
    no injected error (nothing shows what its real errors look like)."""
    if not base_scores:
        return 1.0
    if not injected_scores:
        return 0.0
    b, i = np.sort(base_scores), np.sort(injected_scores)
    ratios = []
    for q in QUANTILES:
        u = float(np.quantile(i, q))
        f_inj = np.searchsorted(i, u, side="right") / len(i)
        f_base = np.searchsorted(b, u, side="right") / len(b)
        se = np.sqrt(max(f_base * (1 - f_base), 0.25 / len(b)) / len(b))
        ratios.append((f_base + 2 * se) / f_inj)
    return float(min(1.0, *ratios))


def _box_oof(ctx: QaContext) -> dict[int, np.ndarray] | None:
    """The run's out-of-fold box-classifier probabilities per train annotation id (None when
    pass 0 has not scored train). Like the detector's predictions they are reused on the copy:
    a box's out-of-fold probabilities do not read its own label, and a classifier re-fitted on
    the copy would learn from the injected errors too (a noisier teacher than the data's)."""
    imgs = ctx.model_scores.get("train")
    if not imgs:
        return None
    return {
        a["id"]: p
        for img in imgs
        for a, p in zip(img["anns"], img["box_probs"], strict=True)
        if p is not None
    }


def _measure_rule(
    ctx: QaContext, rule: Rule, policy: str, shares: dict, seed: int, base: list
) -> dict:
    rate = ctx.cfg.probe_rate
    noise = LabelNoiseCfg(**{k: rate * v for k, v in shares.items()})
    changes0 = _base_changes(policy, base)
    corrupted, truth = corrupted_copy(ctx, noise, seed, changes0)
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
        box_oof=_box_oof(ctx),
    )
    kinds = tuple(shares)
    by_ann = {r["annotation_id"]: r for r in truth if r["kind"] != "drop"}
    drops: dict[int, list[dict]] = {}
    for r in truth:
        if r["kind"] == "drop":
            drops.setdefault(r["image_id"], []).append(r)
    found: set = set()
    on_injected = right = collateral = 0
    injected_scores = []
    for hit in rule.check(probe):
        if hit.split != "train":
            continue
        error, is_right = _is_right(hit, kinds, by_ann, drops)
        if error is not None:
            found.add(error)
        if not _changes(policy, hit):
            continue
        if error is not None:
            on_injected += 1
            right += is_right
            injected_scores.append(finding_score(hit.score))  # the base findings' scale
        elif hit.annotation_id in by_ann:  # an injected box, changed for another reason
            on_injected += 1
        else:  # pass 0's changes are applied on the copy: anything else was caused by it
            collateral += 1
    base_scores = [float(f.score) for f in base if _changes(policy, f)]
    usable = sum(
        ("train", a["id"]) not in ctx.bad_annotations for a in ctx.interim["train"]["annotations"]
    )
    recall = len(found) / len(truth) if truth else 0.0
    share = error_like_share(base_scores, injected_scores)
    n_base = len(base_scores)
    own_rate = ctx.cfg.max_own_error_rate * len(shares)  # per kind: badly placed is shift + scale
    own_found = recall * own_errors_at_most(own_rate, usable)
    fix_right = right / on_injected if on_injected else 0.0  # own errors are fixed as well
    expected_right = min(share * n_base, own_found, n_base) * fix_right
    credited = int(np.floor(expected_right + 1e-9))
    changes = on_injected + collateral + n_base

    def ratio(a: float, b: int) -> float | None:
        return round(a / b, 4) if b else None

    injected_precision = ratio(right, on_injected + collateral)
    return {
        "injected": len(truth),
        "found": len(found),
        "recall": ratio(len(found), len(truth)),
        "changes": changes,
        "right": right + credited,
        "on_injected": on_injected,
        "right_on_injected": right,
        "base": n_base,
        "credited": credited,
        "collateral": collateral,
        "own_errors_found_at_most": round(own_found, 1),
        "error_like_share": round(share, 4),
        # what the rule would apply: its changes on the split as given (see the module docstring)
        "precision": ratio(expected_right, n_base) if n_base else injected_precision,
        "precision_pooled": ratio(right + credited, changes),
        "precision_injected": injected_precision,
        "precision_conservative": ratio(right, changes),
    }


def _verdict(row: dict, policy: str, floor: float, kinds: tuple[str, ...]) -> tuple[bool, str]:
    if not kinds:
        return False, "reports only: no measurement exists for this rule"
    if row["injected"] < MIN_ERRORS:
        return False, (
            f"reports only: {row['injected']} errors injected (< {MIN_ERRORS}), too few boxes "
            "to measure its precision"
        )
    on_split = (
        f"on this split's {row['base']} changes, {row['credited']} credited as the data's own "
        "errors"
        if row["base"]
        else "on injected errors: the rule changes nothing on this split"
    )
    measured = (
        f"{on_split}; {row['right_on_injected']} of {row['on_injected']} fixes right on "
        f"injected errors, {row['collateral']} collateral; found {row['found']} of "
        f"{row['injected']}"
    )
    if policy == "keep":
        return False, f"reports only: policy keep ({measured})"
    if 0 < row["on_injected"] < MIN_ERRORS:
        return False, (
            f"reports only: too few fixes on injected errors ({row['on_injected']} < "
            f"{MIN_ERRORS}) to measure its precision ({measured})"
        )
    if row["precision"] is None or not row["on_injected"]:
        return False, f"reports only: it proposed no fix on the injected errors ({measured})"
    if row["precision"] < floor:
        return False, (
            f"reports only: precision {row['precision']:.2f} < label_qa.min_fix_precision "
            f"{floor} ({measured})"
        )
    return True, f"acts: precision {row['precision']:.2f} >= {floor} ({measured})"
