"""Model-based label checks: cleanlab's ObjectLab scores on out-of-sample predictions.

ObjectLab (Tkachenko et al., "ObjectLab: Automated Diagnosis of Mislabeled Images in Object
Detection Data", 2023) scores every labelled box against a detector's predictions: a *swap* score
(a confident prediction of another class sits on the box), a *bad location* score (the best
same-class prediction overlaps it poorly) and, per confident prediction that touches no label, an
*overlooked* score. Low = likely wrong. We flag scores under the thresholds in
`label_qa.model` and suggest the prediction as the fix. A finding's score is the ObjectLab score,
except for a missing box: 1 - the added prediction's calibrated probability (the overlooked
score is ~0 for every confident unlabelled prediction, so it cannot rank clutter against a
dropped object; the probe needs that ranking, see probe.py).

A swapped class needs a detector that is sure of the other class, which the short-trained fold
models seldom are; `label_wrong_class` therefore also asks a classifier of each box's own pixels,
cross-fitted on the same folds, and cleanlab's confident learning (`box_classifier.py`).

These findings are warnings: they never trip the gate on their own. Their default policy is
`fix` (relabel, move or add the box as suggested), applied on train only
(`label_qa.model.apply_splits`); val and test are the KPI reference, so there they are only
reported (what the fixes recover is measured by `shrinkflow bench-label-qa`; README,
*Measured*).

Detector scores are mapped to calibrated probabilities first (`crossfit.calibrate`), so the
thresholds mean the same for a short-trained fold model and for the champion. Predictions must
be out-of-sample (tasks/label_qa/crossfit.py makes them). Train is always scored by a K-fold
cross-fit (each fold's images by a model trained on the other folds, with the project's detector
and training loop).
Val and test are scored by the registry's `champion` when one is given (it was trained on train
only), else by the last fold model (which never saw them either). When the fold models' mean
held-out mAP@0.5 is under `label_qa.model.min_map50`, no fold model judges anything: a model that
cannot find the objects would only produce false findings (and trip the gate).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from tasks.label_qa import box_classifier
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import Hit, QaContext, dataset_rule

log = logging.getLogger(__name__)


def _scores(ctx: QaContext) -> dict:
    """split -> per image: ann ids, label boxes, classes, predictions, and the three scores."""
    if ctx.model_scores or not ctx.predictions:
        return ctx.model_scores
    from cleanlab.internal.constants import ALPHA
    from cleanlab.object_detection import rank

    m = ctx.cfg.model
    train_boxes = _train_box_evidence(ctx)
    for split, preds in ctx.predictions.items():
        coco = ctx.interim[split]
        cats = sorted(c["id"] for c in coco["categories"])
        index = {c: k for k, c in enumerate(cats)}
        by_image: dict[int, list[dict]] = {i: [] for i in preds}
        for a in coco["annotations"]:
            if a["image_id"] in by_image and a["category_id"] in index:
                by_image[a["image_id"]].append(a)
        ids = list(preds)
        labels = []
        for i in ids:
            xywh = np.array([a["bbox"] for a in by_image[i]], np.float64).reshape(-1, 4)
            labels.append(
                {
                    "bboxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                    "labels": np.array([index[a["category_id"]] for a in by_image[i]], int),
                }
            )
        predictions = [preds[i] for i in ids]
        # the three scores share one matching of labels to predictions per image: computed once
        # and passed as cleanlab's `auxiliary_inputs` (its default recomputes it per score)
        aux = rank._get_valid_inputs_for_compute_scores(ALPHA, labels, predictions)
        kw = {"labels": labels, "predictions": predictions, "auxiliary_inputs": aux}
        swap = rank.compute_swap_box_scores(**kw, high_probability_threshold=m.high_probability)
        badloc = rank.compute_badloc_box_scores(**kw, low_probability_threshold=m.low_probability)
        over = rank.compute_overlooked_box_scores(
            **kw, high_probability_threshold=m.missing_probability
        )
        anns = [a for i in ids for a in by_image[i]]
        probs, issues = _box_evidence(ctx, split, anns, cats, train_boxes)
        ctx.model_scores[split] = [
            {
                "image_id": i,
                "anns": by_image[i],
                "pred": np.concatenate(predictions[n]),  # (M, 5), class-major as cleanlab
                "pred_cls": np.concatenate(
                    [np.full(len(p), c) for c, p in enumerate(predictions[n])]
                ).astype(int),
                "cats": cats,
                "swap": swap[n],
                "badloc": badloc[n],
                "over": over[n],
                "box_probs": [probs.get(a["id"]) for a in by_image[i]],
                "box_issue": [a["id"] in issues for a in by_image[i]],
            }
            for n, i in enumerate(ids)
        ]
    return ctx.model_scores


def _train_box_evidence(ctx: QaContext) -> dict | None:
    """The box classifier on the usable train boxes: their features and labels, the class ids
    and the out-of-fold probabilities (folds of the detector cross-fit). Sets ctx.box_accuracy.
    None when it is off or there are no boxes."""
    if not ctx.cfg.model.box_classifier:
        return None
    cats = sorted(c["id"] for c in ctx.interim["train"]["categories"])
    index = {c: k for k, c in enumerate(cats)}
    anns = [
        a
        for a in ctx.interim["train"]["annotations"]
        if a["category_id"] in index and _usable(ctx, "train", a)
    ]
    if not anns:
        return None
    y = np.array([index[a["category_id"]] for a in anns])
    fold = {i: k for k, f in enumerate(ctx.crossfit_folds) for i in f}
    fold_of = np.array([fold.get(a["image_id"], a["image_id"] % ctx.cfg.model.folds) for a in anns])
    paths = ctx.splits["train"].paths
    if ctx.box_oof is not None:  # the probe: the run's out-of-fold probabilities, per box
        keep = [n for n, a in enumerate(anns) if a["id"] in ctx.box_oof]
        if not keep:
            return None
        anns, y = [anns[n] for n in keep], y[keep]
        x, probs = None, np.stack([ctx.box_oof[a["id"]] for a in anns])
    elif ctx.box_features is None:  # chosen once per run, on the train labels as given
        chosen, x, probs, ctx.box_feature_accuracy = box_classifier.select_features(
            anns, paths, y, fold_of, len(cats), ctx.seed
        )
        ctx.box_features = chosen.name
    else:  # a probe without the run's probabilities re-fits with the run's choice
        x = box_classifier.box_features(anns, paths, box_classifier.FEATURE_SETS[ctx.box_features])
        probs = box_classifier.out_of_fold_probs(x, y, fold_of, len(cats), ctx.seed)
    ctx.box_accuracy = float((probs.argmax(1) == y).mean())
    if ctx.box_trusted is None:  # the probe (injected noise lowers accuracy) keeps the run's
        ctx.box_trusted = ctx.box_accuracy >= ctx.cfg.model.min_box_accuracy
    log.info(
        "label_qa box classifier (%s): out-of-fold accuracy %.3f on %d train boxes",
        ctx.box_features,
        ctx.box_accuracy,
        len(y),
    )
    return {"anns": anns, "x": x, "y": y, "probs": probs, "cats": cats}


def _box_evidence(
    ctx: QaContext, split: str, anns: list[dict], cats: list[int], train: dict | None
) -> tuple[dict[int, np.ndarray], set[int]]:
    """The box classifier's out-of-sample class probabilities per annotation id of `anns`
    (class index order of `cats`) and the ids cleanlab's confident learning flags (see
    `box_classifier`). Empty when it is off or less accurate on train than
    `label_qa.model.min_box_accuracy` (a classifier that cannot read the boxes would only
    produce false findings)."""
    if train is None or train["cats"] != cats or not ctx.box_trusted:
        return {}, set()
    index = {c: k for k, c in enumerate(cats)}
    if split == "train":
        mine, probs, y = train["anns"], train["probs"], train["y"]
    else:
        mine = [a for a in anns if a["category_id"] in index and _usable(ctx, split, a)]
        if not mine:
            return {}, set()
        features = box_classifier.FEATURE_SETS[ctx.box_features]
        x = box_classifier.box_features(mine, ctx.splits[split].paths, features)
        if "predict" not in train:  # fitted on all train boxes once, for val and test
            train["predict"] = box_classifier.fitted(train["x"], train["y"], len(cats), ctx.seed)
        probs = train["predict"](x)
        y = np.array([index[a["category_id"]] for a in mine])
    flagged = box_classifier.label_issues(y, probs)
    log.info("label_qa box classifier on %s: %d of %d boxes flagged", split, flagged.sum(), len(y))
    return (
        {a["id"]: probs[n] for n, a in enumerate(mine)},
        {a["id"] for n, a in enumerate(mine) if flagged[n]},
    )


def _xyxy_to_xywh(b: np.ndarray) -> list[float]:
    return [
        round(float(b[0]), 2),
        round(float(b[1]), 2),
        round(float(b[2] - b[0]), 2),
        round(float(b[3] - b[1]), 2),
    ]


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:4] - xyxy[:, :2]], 1)


def _ious(ann: dict, img: dict, mask: np.ndarray) -> np.ndarray:
    """IoU of `ann` with every prediction (-1 where `mask` is False)."""
    p = img["pred"][:, :4]
    xywh = np.concatenate([p[:, :2], p[:, 2:] - p[:, :2]], 1)
    return np.where(mask, iou_matrix(np.array([ann["bbox"]], float), xywh)[0], -1.0)


def _best_iou(ann: dict, img: dict, mask: np.ndarray) -> float:
    return float(_ious(ann, img, mask).max()) if mask.any() else 0.0


def _best_match(ann: dict, img: dict, mask: np.ndarray) -> int | None:
    """Index of the prediction under `mask` overlapping `ann` most (None if none overlaps)."""
    if not mask.any():
        return None
    iou = _ious(ann, img, mask)
    best = int(np.argmax(iou))
    return best if iou[best] > 0 else None


def _usable(ctx: QaContext, split: str, ann: dict) -> bool:
    return (split, ann["id"]) not in ctx.bad_annotations


@dataset_rule("label_wrong_class", "warning", "fix", phase=2)
def _wrong_class(ctx: QaContext) -> Iterator[Hit]:
    """The box holds an object of another class: either a confident detection of another class
    sits on it (ObjectLab swap score under `label_qa.model.swap_threshold`) or the box
    classifier's out-of-sample probabilities disagree with its class (cleanlab confident
    learning, see `box_classifier`). Boxes that also fit their object poorly (`box_badly_placed`)
    are left to that rule: their crop shows part of an object, so its class says little. The fix
    relabels the box with the model's class."""
    m = ctx.cfg.model
    for split, imgs in _scores(ctx).items():
        name = ctx.splits[split].category_name
        for img in imgs:
            for n, (ann, s) in enumerate(zip(img["anns"], img["swap"], strict=True)):
                if not _usable(ctx, split, ann):
                    continue
                k = img["cats"].index(ann["category_id"])
                hit = _objectlab_swap(ann, img, k, float(s), m, name)
                if hit is None and img["box_issue"][n] and img["badloc"][n] >= m.badloc_threshold:
                    probs = img["box_probs"][n]
                    cat = img["cats"][int(np.argmax(probs))]
                    if cat != ann["category_id"]:
                        msg = (
                            f"labelled {name(ann['category_id'])!r}; the box classifier sees "
                            f"{name(cat)!r} ({probs.max():.2f}; {name(ann['category_id'])!r} "
                            f"{probs[k]:.2f})"
                        )
                        # score: cleanlab's self-confidence (the probability of the given class)
                        hit = (msg, float(probs[k]), {"category_id": cat})
                if hit is not None:
                    yield Hit(split, ann["image_id"], ann["id"], *hit)


def _objectlab_swap(ann: dict, img: dict, k: int, s: float, m, name) -> tuple | None:
    """(message, score, fix) when ObjectLab's swap score flags `ann` (labelled class index k)."""
    if s >= m.swap_threshold:
        return None
    same = (img["pred_cls"] == k) & (img["pred"][:, 4] > m.low_probability)
    if _best_iou(ann, img, same) >= 0.5:
        return None  # the model also sees the labelled class there: ambiguous, not a swap
    mask = (img["pred_cls"] != k) & (img["pred"][:, 4] > m.high_probability)
    best = _best_match(ann, img, mask)
    fix = None
    msg = f"labelled {name(ann['category_id'])!r}"
    if best is not None:
        cat = img["cats"][int(img["pred_cls"][best])]
        msg += f"; the model sees {name(cat)!r} ({img['pred'][best, 4]:.2f})"
        fix = {"category_id": cat, "model_box": _xyxy_to_xywh(img["pred"][best])}
    return msg, s, fix


@dataset_rule("box_badly_placed", "warning", "fix", phase=2)
def _badly_placed(ctx: QaContext) -> Iterator[Hit]:
    """The best same-class prediction overlaps the box poorly (ObjectLab bad-location score
    under `label_qa.model.badloc_threshold`); the fix moves the box onto that prediction."""
    m = ctx.cfg.model
    for split, imgs in _scores(ctx).items():
        for img in imgs:
            for ann, s in zip(img["anns"], img["badloc"], strict=True):
                if s >= m.badloc_threshold or not _usable(ctx, split, ann):
                    continue
                k = img["cats"].index(ann["category_id"])
                mask = (img["pred_cls"] == k) & (img["pred"][:, 4] > m.low_probability)
                best = _best_match(ann, img, mask)
                fix = None if best is None else {"bbox": _xyxy_to_xywh(img["pred"][best])}
                label = ctx.splits[split].category_name(ann["category_id"])
                msg = f"{label!r} box {[round(v, 1) for v in ann['bbox']]} fits the object poorly"
                if fix:
                    msg += f"; the model's box is {fix['bbox']}"
                yield Hit(split, ann["image_id"], ann["id"], msg, float(s), fix)


@dataset_rule("box_missing", "warning", "fix", phase=2)
def _missing(ctx: QaContext) -> Iterator[Hit]:
    """A confident prediction touches no labelled box (ObjectLab overlooked score under
    `label_qa.model.overlooked_threshold`); the fix adds it as a box. The finding's score is
    1 - the prediction's calibrated probability: ObjectLab's overlooked score is ~0 for every
    confident unlabelled prediction, so it cannot rank a plain object above clutter read as one
    (the probe's score bound needs that ranking, see `probe.py`)."""
    m = ctx.cfg.model
    for split, imgs in _scores(ctx).items():
        for img in imgs:
            if (split, img["image_id"]) in ctx.bad_images:
                continue
            flagged = [
                j
                for j, s in enumerate(img["over"])
                if not np.isnan(s) and s < m.overlooked_threshold
            ]
            # one finding per object: the most confident of overlapping candidates (greedy NMS;
            # a missed digit often draws peaks of several classes)
            kept: list[int] = []
            for j in sorted(flagged, key=lambda j: -img["pred"][j, 4]):
                if (
                    not kept
                    or iou_matrix(_xywh(img["pred"][[j]]), _xywh(img["pred"][kept])).max() < 0.3
                ):
                    kept.append(j)
            for j in kept:
                s = 1.0 - float(img["pred"][j, 4])
                cat = img["cats"][int(img["pred_cls"][j])]
                box = _xyxy_to_xywh(img["pred"][j])
                msg = (
                    f"unlabelled {ctx.splits[split].category_name(cat)!r} at {box} "
                    f"({img['pred'][j, 4]:.2f})"
                )
                yield Hit(
                    split,
                    img["image_id"],
                    None,
                    msg,
                    float(s),
                    {"add": {"category_id": cat, "bbox": box}},
                )
