"""Out-of-sample predictions for label QA's model checks: the K-fold cross-fit of the family's
detector over train, the champion (or the last fold model) over val and test, and calibration of
detector scores into probabilities, so the thresholds in `label_qa.model` mean the same for a
short-trained fold model and for the champion. Deterministic: seeded folds and training, fixed
thread count (`deterministic`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import TrainCfg
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.registry import QaContext
from tasks.metrics.detection import Runner, coco_map, predict
from tasks.models.config import ModelCfg
from tasks.preprocess.letterbox import build_size

log = logging.getLogger(__name__)
SCORE_FLOOR = 0.05  # predictions below this confidence are not passed to cleanlab


def split_set(
    ctx: QaContext, split: str, image_ids: list[int], size: int | tuple[int, int]
) -> DetectionSet:
    coco = ctx.interim[split]
    keep = set(image_ids)
    sub = {
        "images": [im for im in coco["images"] if im["id"] in keep],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
        "categories": coco["categories"],
    }
    return DetectionSet({"root": str(ctx.root), "splits": {split: sub}}, split, size)


def to_cleanlab(rows: list[dict], image_ids: list[int], categories: list[int]) -> dict:
    """COCO result rows -> image id -> per-class list of (N, 5) [x0, y0, x1, y1, score]."""
    index = {c: k for k, c in enumerate(categories)}
    out = {i: [[] for _ in categories] for i in image_ids}
    for r in rows:
        if r["score"] < SCORE_FLOOR:
            continue
        x, y, w, h = r["bbox"]
        out[r["image_id"]][index[r["category_id"]]].append([x, y, x + w, y + h, r["score"]])
    return {
        i: [np.array(c, np.float32).reshape(-1, 5) for c in per_class]
        for i, per_class in out.items()
    }


def torch_runner(adapter, model) -> Runner:
    """A Runner (float32 (B, 3, S, S) -> num, boxes, scores, classes) for a PyTorch model."""
    import torch

    wrapped = adapter.deployable(model, max_detections=100, score_floor=SCORE_FLOOR, fold=False)

    def run(x: np.ndarray):
        with torch.inference_mode():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    return run


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic torch kernels (where torch has them; others warn) and a fixed CPU thread
    count, so the same data and params give the same fold models and the same findings."""
    import torch

    was, n = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(n)


def crossfit(
    ctx: QaContext, train_cfg: TrainCfg, model_cfg: ModelCfg
) -> tuple[dict, Runner, float]:
    """K-fold cross-fit on the interim train split: returns out-of-fold predictions per train
    image (cleanlab format), the runner of the last fold model and the mean held-out mAP@0.5.
    The fold models are the project's family (`model_cfg`; the built-in detector at
    `label_qa.model.width`). Folds and training are seeded from `train.seed`."""
    from tasks.models import adapter_for
    from tasks.models.training import fit

    m = ctx.cfg.model
    narrow = model_cfg.centernet.model_copy(update={"width": m.width})
    adapter = adapter_for(model_cfg.model_copy(update={"centernet": narrow}))
    ids = [im["id"] for im in ctx.interim["train"]["images"]]
    folds = np.array_split(np.random.default_rng(train_cfg.seed).permutation(ids), m.folds)
    ctx.crossfit_folds = [sorted(int(i) for i in f) for f in folds]
    fold_cfg = train_cfg.model_copy(
        update={"input_size": m.input_size, "epochs": m.epochs, "lr": m.lr}
    )
    categories = sorted(c["id"] for c in ctx.interim["train"]["categories"])
    preds: dict = {}
    runner = None
    maps = []
    for k, held in enumerate(folds):
        held_ids = sorted(int(i) for i in held)
        rest = sorted(set(ids) - set(held_ids))
        train = split_set(ctx, "train", rest, m.input_size)
        val = split_set(ctx, "train", held_ids, m.input_size)
        model = adapter.build(len(categories), build_size(m.input_size), train_cfg.seed + k)
        model, _ = fit(
            adapter,
            model,
            fold_cfg,
            train=train,
            val=None,  # no per-epoch curve: the held-out fold is scored once, below
            epochs=m.epochs,
            lr=m.lr,
            desc=f"fold {k + 1}",
        )
        runner = torch_runner(adapter, model)
        rows = predict(runner, val)
        maps.append(coco_map(val.coco, rows)["map50"])
        log.info(
            "label_qa cross-fit fold %d/%d: %d train, %d held out, held-out mAP@0.5 %.3f",
            k + 1,
            m.folds,
            len(train),
            len(val),
            maps[-1],
        )
        preds.update(to_cleanlab(rows, held_ids, categories))
    return preds, runner, float(np.mean(maps))


def calibrate(preds: dict, coco: dict) -> dict:
    """Detector scores -> estimated probability that the detection is right.

    A heatmap detector's peak scores are not probabilities (CenterNet peaks of a short-trained
    model stay under ~0.5), so cleanlab's probability thresholds would see no confident
    prediction. We fit an isotonic map from score to "matches a labelled box of its class at
    IoU >= 0.5" on the split's own out-of-sample predictions (Zadrozny & Elkan, 2002); label
    noise biases it slightly low, which errs on the side of fewer findings.
    """
    from sklearn.isotonic import IsotonicRegression

    cats = sorted(c["id"] for c in coco["categories"])
    boxes: dict[int, list[tuple[int, list[float]]]] = {}
    for a in coco["annotations"]:
        if a["category_id"] in cats:
            boxes.setdefault(a["image_id"], []).append((cats.index(a["category_id"]), a["bbox"]))
    scores, hits = [], []
    for image_id, per_class in preds.items():
        labelled = boxes.get(image_id, [])
        for k, p in enumerate(per_class):
            if not len(p):
                continue
            same = np.array([b for c, b in labelled if c == k], float).reshape(-1, 4)
            xywh = np.concatenate([p[:, :2], p[:, 2:4] - p[:, :2]], 1)
            iou = iou_matrix(xywh, same).max(1) if len(same) else np.zeros(len(p))
            scores += p[:, 4].tolist()
            hits += (iou >= 0.5).tolist()
    if len(set(hits)) < 2:
        return preds  # nothing to fit (all right or all wrong): keep the raw scores
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, hits)
    out = {}
    for image_id, per_class in preds.items():
        out[image_id] = []
        for p in per_class:
            q = p.copy()
            if len(q):
                q[:, 4] = iso.predict(p[:, 4])
            out[image_id].append(q)
    return out


def predict_splits(
    ctx: QaContext,
    train_cfg: TrainCfg,
    model_cfg: ModelCfg,
    champion: tuple[Runner, int] | None,
) -> None:
    """Fill ctx.predictions for every split (see the module docstring for who predicts what),
    under `deterministic` kernels with `train.threads` threads."""
    with deterministic(train_cfg.threads):
        _predict(ctx, train_cfg, model_cfg, champion)


def _predict(
    ctx: QaContext,
    train_cfg: TrainCfg,
    model_cfg: ModelCfg,
    champion: tuple[Runner, int] | None,
) -> None:
    ctx.predictions = {}
    fold_runner = None
    if ctx.interim["train"]["images"]:
        ctx.seed = train_cfg.seed
        raw, fold_runner, ctx.crossfit_map50 = crossfit(ctx, train_cfg, model_cfg)
        if ctx.crossfit_map50 >= ctx.cfg.model.min_map50:
            ctx.predictions["train"] = calibrate(raw, ctx.interim["train"])
            ctx.prediction_source["train"] = f"cross-fit ({ctx.cfg.model.folds} folds)"
        else:  # a model that cannot find the objects cannot judge their labels
            fold_runner = None
            ctx.prediction_source["train"] = (
                f"none: cross-fit held-out mAP@0.5 {ctx.crossfit_map50:.3f} < "
                f"label_qa.model.min_map50 {ctx.cfg.model.min_map50}"
            )
            log.warning("label_qa: model checks skipped (%s)", ctx.prediction_source["train"])
    for split in ("val", "test"):
        if champion is not None:
            runner, size = champion
            ctx.prediction_source[split] = "champion"
        elif fold_runner is not None:
            runner, size = fold_runner, ctx.cfg.model.input_size
            ctx.prediction_source[split] = "cross-fit (last fold model)"
        else:
            continue
        ids = [im["id"] for im in ctx.interim[split]["images"]]
        data = split_set(ctx, split, ids, size)
        categories = sorted(c["id"] for c in ctx.interim[split]["categories"])
        raw = to_cleanlab(predict(runner, data), ids, categories)
        ctx.predictions[split] = calibrate(raw, ctx.interim[split])
