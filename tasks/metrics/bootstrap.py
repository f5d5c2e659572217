"""Paired bootstrap over test images of the mAP@0.5 difference between two models.

COCOeval is run once per model to get per-image matches at IoU 0.5 (pycocotools' `evaluateImg`:
greedy matching by score, crowd/ignore handling, 100 detections per image). A resample draws test
images with replacement; each image's detections and ground truth then count as many times as it
was drawn, and AP@0.5 is recomputed in numpy with COCO's 101-point interpolation. Both models get
the same draws (paired), so the interval is on the difference itself (Efron & Tibshirani, "An
Introduction to the Bootstrap", 1993, ch. 13; percentile interval).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

from tasks.metrics.detection import coco_eval

RECALL_THRESHOLDS = np.linspace(0.0, 1.00, 101)  # COCOeval's recThrs
MAX_DETECTIONS = 100
CHUNK = 200  # resamples per vectorised block: (CHUNK, detections) float64 arrays


@dataclass
class ClassMatches:
    """One class over the test images, detections sorted by score (highest first)."""

    image: np.ndarray  # int (D,): index of the detection's image
    tp: np.ndarray  # float (D,): 1 = matched a ground-truth box at IoU >= 0.5
    positives: np.ndarray  # float (N,): non-ignored ground-truth boxes per image


def match_table(gt: dict, detections: list[dict]) -> list[ClassMatches]:
    """Per-class, per-image matches of `detections` against `gt` at IoU 0.5 (COCOeval)."""
    image_ids = [im["id"] for im in gt["images"]]
    index = {i: n for n, i in enumerate(image_ids)}
    if not detections:  # every class has AP 0 where it has ground truth
        positives: dict[int, np.ndarray] = {}
        for a in gt["annotations"]:
            if not a.get("iscrowd", 0):
                positives.setdefault(a["category_id"], np.zeros(len(image_ids)))
                positives[a["category_id"]][index[a["image_id"]]] += 1
        return [ClassMatches(np.zeros(0, int), np.zeros(0), p) for p in positives.values()]
    ev = coco_eval(gt, detections)
    ev.params.imgIds = image_ids
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
    ev.params.maxDets = [MAX_DETECTIONS]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    n_img = len(ev.params.imgIds)
    table = []
    # evalImgs is ordered (category, area, image); one area range here
    for k, _ in enumerate(ev.params.catIds):
        scores, tps, imgs = [], [], []
        positives = np.zeros(n_img)
        for i in range(n_img):
            e = ev.evalImgs[k * n_img + i]
            if e is None:
                continue
            positives[i] = float((~np.asarray(e["gtIgnore"], bool)).sum())
            keep = ~np.asarray(e["dtIgnore"][0], bool)
            scores.append(np.asarray(e["dtScores"])[keep])
            tps.append((np.asarray(e["dtMatches"][0]) > 0)[keep])
            imgs.append(np.full(int(keep.sum()), index[ev.params.imgIds[i]]))
        if positives.sum() == 0:
            continue  # no ground truth: COCO leaves the class out of the mean
        s = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-s, kind="mergesort")  # COCOeval's own sort
        table.append(
            ClassMatches(
                image=np.concatenate(imgs)[order] if imgs else np.zeros(0, int),
                tp=np.concatenate(tps)[order].astype(float) if tps else np.zeros(0),
                positives=positives,
            )
        )
    return table


def _ap(cls: ClassMatches, counts: np.ndarray) -> np.ndarray:
    """AP@0.5 of one class for each row of `counts` (B, N): how often each image was drawn."""
    npos = counts @ cls.positives  # (B,)
    if len(cls.tp) == 0:
        return np.where(npos > 0, 0.0, np.nan)
    w = counts[:, cls.image]  # (B, D): each detection weighs as often as its image was drawn
    tp = np.cumsum(w * cls.tp, axis=1)
    fp = np.cumsum(w * (1 - cls.tp), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / npos[:, None]
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # envelope
    ap = np.empty(len(counts))
    for b in range(len(counts)):
        idx = np.searchsorted(recall[b], RECALL_THRESHOLDS, side="left")
        hit = idx < recall.shape[1]
        ap[b] = np.where(hit, precision[b, np.minimum(idx, recall.shape[1] - 1)], 0.0).mean()
    return np.where(npos > 0, ap, np.nan)


def map50(table: list[ClassMatches], counts: np.ndarray) -> np.ndarray:
    """mAP@0.5 (mean over classes with ground truth in the resample) per row of `counts`."""
    if not table:
        return np.zeros(len(counts))
    aps = np.stack([_ap(c, counts) for c in table])  # (K, B)
    return np.nanmean(aps, axis=0)


def paired_bootstrap(
    gt: dict,
    challenger: list[dict],
    champion: list[dict],
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    """mAP@0.5 of both models, their difference (challenger - champion) and its bootstrap CI.

    Returns figures in mAP units (0..1): `challenger_map50`, `champion_map50`, `diff`,
    `ci_low`, `ci_high`, plus `resamples`, `confidence`, `images`.
    """
    return paired_tables(
        match_table(gt, challenger),
        match_table(gt, champion),
        len(gt["images"]),
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def paired_tables(
    a: list[ClassMatches],
    b: list[ClassMatches],
    n: int,
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    """`paired_bootstrap` from two `match_table`s over the same `n` test images (a caller that
    compares one model with several builds each table once)."""
    full = np.ones((1, n))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, CHUNK):
        m = min(CHUNK, resamples - start)
        draws = rng.integers(0, n, size=(m, n))
        counts = np.zeros((m, n))
        np.add.at(counts, (np.arange(m)[:, None], draws), 1.0)
        diffs.append(map50(a, counts) - map50(b, counts))
    d = np.concatenate(diffs)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    ma, mb = float(map50(a, full)[0]), float(map50(b, full)[0])
    return {
        "challenger_map50": ma,
        "champion_map50": mb,
        "diff": ma - mb,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "resamples": resamples,
        "confidence": confidence,
        "images": n,
    }
