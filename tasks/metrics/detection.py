"""Detection metrics with pycocotools: mAP@0.5, mAP@0.5:0.95, precision/recall at an operating
threshold (from COCOeval's own matching) and the PR curve at IoU 0.5 (`coco_metrics`, the
evaluate stage's KPIs); and the two mAPs alone by faster-coco-eval (`coco_map`: the same COCO
protocol in C++, equal figures, ~9x faster on a 200-image split), for the loops that only rank
models by mAP: per-epoch validation, quantize's sweeps, variants, label QA's fold scores."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tasks.harness.signature import Runner
from tasks.preprocess.letterbox import Letterbox


def predict(runner: Runner, dataset, batch_size: int = 32) -> list[dict]:
    """Run `runner` over a DetectionSet; return COCO result rows in original image pixels."""
    rows: list[dict] = []
    for start in range(0, len(dataset), batch_size):
        sl = slice(start, start + batch_size)
        outputs = runner(dataset.batch(sl))
        rows += to_rows(outputs, dataset.ids[sl], dataset.letterboxes[sl], dataset.categories)
    return rows


def to_rows(
    outputs: Sequence[np.ndarray],
    image_ids: Sequence[int],
    letterboxes: Sequence[Letterbox],
    categories: Sequence[int],
) -> list[dict]:
    """A runner's (num, boxes xyxy, scores, classes) for one batch as COCO result rows: boxes
    mapped by `letterboxes[j].to_image` back to image j's pixels, class index k named
    `categories[k]`."""
    num, boxes, scores, classes = (np.asarray(o) for o in outputs)
    rows: list[dict] = []
    for j, image_id in enumerate(image_ids):
        n = int(num[j])
        if n == 0:
            continue
        back = letterboxes[j].to_image(boxes[j, :n])
        for k in range(n):
            x0, y0, x1, y1 = back[k].tolist()
            rows.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(categories[int(classes[j, k])]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(scores[j, k]),
                }
            )
    return rows


def coco_eval(gt: dict, detections: list[dict]) -> COCOeval:
    """A bbox COCOeval of `detections` (non-empty) against the COCO dict `gt`, not yet run."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = _gt_dataset(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        return COCOeval(coco_gt, coco_dt, "bbox")


def _gt_dataset(gt: dict) -> dict:
    """The COCO dict's images, annotations (area defaulting to the box's) and categories."""
    data = {k: gt[k] for k in ("images", "annotations", "categories")}
    for a in data["annotations"]:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    return data


def coco_map(gt: dict, detections: list[dict]) -> dict:
    """{map50, map50_95} of `detections` against the ground-truth COCO dict `gt`: COCO's bbox
    protocol (101-point interpolated AP, area "all", 100 detections per image), computed by
    faster-coco-eval; the same figures as `coco_metrics` (tests/test_metrics.py)."""
    from faster_coco_eval import COCO as FastCOCO
    from faster_coco_eval import COCOeval_faster

    if not detections or not gt["annotations"]:
        return {"map50": 0.0, "map50_95": 0.0}
    coco_gt = FastCOCO()
    coco_gt.dataset = _gt_dataset(gt)
    coco_gt.createIndex()
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), "bbox", print_function=_silent)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"map50": float(ev.stats[1]), "map50_95": float(ev.stats[0])}


def _silent(*_args) -> None:
    """faster-coco-eval's print function: the summary table stays unprinted."""


def coco_metrics(gt: dict, detections: list[dict], score_threshold: float) -> dict:
    """COCO evaluation of `detections` against the ground-truth COCO dict `gt`.

    Returns map50, map50_95, precision and recall at `score_threshold` (IoU 0.5, COCOeval's
    greedy matching, area "all", 100 detections), and `pr_curve` rows {recall, precision}.
    """
    empty = {
        "map50": 0.0,
        "map50_95": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "ap50_per_class": {},
        "pr_curve": [{"recall": r, "precision": 0.0} for r in np.linspace(0, 1, 101)],
    }
    if not detections or not gt["annotations"]:
        return empty
    ev = coco_eval(gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: (T iou, R recall, K class, A area, M maxdet); -1 where a class has no gt
    prec = ev.eval["precision"][0, :, :, 0, -1]
    valid = prec.mean(axis=0) > -1
    curve = np.where(prec[:, valid] > -1, prec[:, valid], 0).mean(axis=1)
    tp = n_det = 0
    n_gt = sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0))
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0] or e["maxDet"] != ev.params.maxDets[-1]:
            continue
        keep = (np.asarray(e["dtScores"]) >= score_threshold) & ~e["dtIgnore"][0].astype(bool)
        n_det += int(keep.sum())
        tp += int(((e["dtMatches"][0] > 0) & keep).sum())
    per_class = {
        str(cat): float(prec[:, k][prec[:, k] > -1].mean()) if (prec[:, k] > -1).any() else None
        for k, cat in enumerate(ev.params.catIds)
    }
    return {
        "map50": float(ev.stats[1]),
        "map50_95": float(ev.stats[0]),
        "precision": tp / n_det if n_det else 0.0,
        "recall": tp / n_gt if n_gt else 0.0,
        "ap50_per_class": per_class,
        "pr_curve": [
            {"recall": float(r), "precision": float(p)}
            for r, p in zip(ev.params.recThrs, curve, strict=True)
        ],
    }


def detection_parity(
    reference: list[dict], candidate: list[dict], *, iou: float, min_score: float
) -> dict:
    """How closely `candidate` reproduces `reference` detections (both COCO result rows).

    Detections scoring at least `min_score` are matched greedily, highest reference score first,
    to an unused candidate of the same class with IoU >= `iou` (pycocotools' box IoU). Returns
    the share of reference detections matched, the candidates left over, and the score gap and
    IoU of the matched pairs.
    """
    from pycocotools import mask as mask_utils

    def by_image(rows: list[dict]) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for r in rows:
            if r["score"] >= min_score:
                out.setdefault(r["image_id"], []).append(r)
        return out

    ref, cand = by_image(reference), by_image(candidate)
    n_ref = matched = extra = 0
    gaps, ious = [], []
    for image_id in set(ref) | set(cand):
        r = sorted(ref.get(image_id, []), key=lambda d: -d["score"])
        c = cand.get(image_id, [])
        n_ref += len(r)
        if not r or not c:
            extra += len(c)
            continue
        overlap = np.asarray(
            mask_utils.iou([d["bbox"] for d in r], [d["bbox"] for d in c], [0] * len(c))
        )  # (len(r), len(c))
        same = np.array([[a["category_id"] == b["category_id"] for b in c] for a in r])
        overlap = np.where(same, overlap, 0.0)
        used = np.zeros(len(c), bool)
        for i, det in enumerate(r):
            j = int(np.argmax(np.where(used, -1.0, overlap[i])))
            if not used[j] and overlap[i, j] >= iou:
                used[j] = True
                matched += 1
                gaps.append(abs(det["score"] - c[j]["score"]))
                ious.append(overlap[i, j])
        extra += int((~used).sum())
    return {
        "match_rate": matched / n_ref if n_ref else 1.0,
        "reference_detections": n_ref,
        "unmatched_candidates": extra,
        "score_abs_diff_mean": float(np.mean(gaps)) if gaps else 0.0,
        "score_abs_diff_max": float(np.max(gaps)) if gaps else 0.0,
        "matched_iou_mean": float(np.mean(ious)) if ious else 0.0,
    }
