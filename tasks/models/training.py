"""The training loop every PyTorch stage shares (train, prune's fine-tune, distill, QAT, label
QA's cross-fit), for any model family: the family's adapter supplies forward pass and loss.

Mixed precision (bf16 autocast on CPU, fp16 + GradScaler on CUDA), seeded, AdamW with a one-cycle
schedule, box-aware augmentation (tasks/preprocess/augment.py). Each epoch ends with val mAP
computed on the
deployable graph's decode (`evaluate_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import TrainCfg
from tasks.metrics.detection import coco_metrics, predict
from tasks.models.base import ModelAdapter
from tasks.preprocess.augment import augmenter
from tasks.preprocess.letterbox import input_wh

log = logging.getLogger(__name__)


def evaluate_model(
    adapter: ModelAdapter, model: nn.Module, data: DetectionSet, score_threshold: float = 0.3
) -> dict:
    """COCO metrics of the PyTorch model on a split (decode as in the exported graph)."""
    wrapped = adapter.deployable(model, max_detections=100, score_floor=0.01, fold=False)

    def runner(x: np.ndarray):
        with torch.inference_mode():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    was_training = model.training
    model.eval()
    result = coco_metrics(data.coco, predict(runner, data), score_threshold)
    model.train(was_training)
    return result


def pick_device(cfg: TrainCfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def fit(
    adapter: ModelAdapter,
    model: nn.Module,
    cfg: TrainCfg,
    *,
    train: DetectionSet,
    val: DetectionSet,
    epochs: int,
    lr: float,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "epoch",
) -> tuple[nn.Module, list[dict]]:
    """The training loop shared by train, prune (fine-tune) and distill.

    `cfg` supplies batch size, weight decay, augmentation, AMP, device, threads and seed; the
    family's `adapter` supplies the forward pass and the loss. `extra_loss(raw, x)` is added to
    the detection loss (distillation uses it). After each epoch
    `on_epoch(row)` gets {epoch, train_loss, val_map50, val_map50_95}. Returns the model on the
    CPU in eval mode and the per-epoch rows.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    model.to(device).requires_grad_(True)  # a copy of a frozen model (e.g. a teacher) trains too
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    w, h = input_wh(adapter.input_size(model))
    aug = augmenter(cfg.augment, w, h, cfg.seed)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        losses = []
        bar = tqdm(
            range(steps_per_epoch), desc=f"{desc} {epoch}/{epochs}", leave=False, disable=None
        )
        for step in bar:
            idx = np.sort(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            images = train.images[idx]
            boxes = [train.boxes[i] for i in idx]
            labels = [train.labels[i] for i in idx]
            if aug is not None:
                images, boxes, labels = aug(images, boxes, labels, train, rng)
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                raw = adapter.forward_train(model, x)
                extra = extra_loss(raw, x) if extra_loss else None
            loss = adapter.loss(model, raw, boxes, labels)
            if extra is not None:
                loss = loss + extra.float()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        model.cpu()
        val_metrics = evaluate_model(adapter, model, val)
        model.to(device)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_map50": val_metrics["map50"],
            "val_map50_95": val_metrics["map50_95"],
        }
        log.info(
            "%s %d: loss %.4f  val mAP@0.5 %.4f", desc, epoch, row["train_loss"], row["val_map50"]
        )
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return model.cpu().eval(), history
