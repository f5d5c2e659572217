"""Stage `train`: the FP32 detector, trained on the cleaned manifest.

Mixed precision (bf16 autocast on CPU, fp16 + GradScaler on CUDA), seeded, AdamW with a one-cycle
schedule. Per epoch: train loss and val mAP to MLflow and to the DVC plot `plots/curves.csv`.
The checkpoint holds the model config, weights and categories (loadable with weights_only=True).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from tqdm import tqdm

from tasks.augment import augmenter
from tasks.cli import stage_entry
from tasks.coco import DetectionSet, check_min_boxes, load_splits, read_manifest
from tasks.config import TrainCfg
from tasks.io import meta, remove, write_json, write_text
from tasks.metrics import coco_metrics, predict
from tasks.model import STRIDE, Detector, DetectorConfig, DetectorWithDecode, macs_and_params

log = logging.getLogger(__name__)


def make_targets(boxes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, size: int):
    """CenterNet targets on the stride-4 grid.

    Returns heat (B, C, H, W) with an elliptical Gaussian per object (TTFNet, arXiv:1909.00700),
    reg (B, 4, H, W) = box w, h and centre offset in cells, mask (B, H, W) = 1 at object centres.
    """
    h = w = size // STRIDE
    b = len(boxes)
    heat = np.zeros((b, num_classes, h, w), np.float32)
    reg = np.zeros((b, 4, h, w), np.float32)
    mask = np.zeros((b, h, w), np.float32)
    ys, xs = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    for i, (bx, lb) in enumerate(zip(boxes, labels, strict=True)):
        for (x0, y0, x1, y1), c in zip(bx / STRIDE, lb, strict=True):
            bw, bh = x1 - x0, y1 - y0
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            sx, sy = max(bw * 0.54 / 6, 0.5), max(bh * 0.54 / 6, 0.5)
            g = np.exp(-((xs - ix) ** 2) / (2 * sx**2) - ((ys - iy) ** 2) / (2 * sy**2))
            np.maximum(heat[i, c], g, out=heat[i, c])
            reg[i, :, iy, ix] = (bw, bh, cx - ix, cy - iy)
            mask[i, iy, ix] = 1.0
    return torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)


def detection_loss(raw: torch.Tensor, heat, reg, mask, num_classes: int) -> torch.Tensor:
    """Penalty-reduced focal loss on the heatmap + L1 on size (x0.1) and offset at centres."""
    logits = raw[:, :num_classes].float()
    pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    neg_w = (1 - heat).pow(4)
    pos_loss = (pos * (1 - pred).pow(2) * torch.log(pred)).sum()
    neg_loss = ((1 - pos) * neg_w * pred.pow(2) * torch.log(1 - pred)).sum()
    n = mask.sum().clamp(min=1)
    focal = -(pos_loss + neg_loss) / n
    r = raw[:, num_classes : num_classes + 4].float()
    m = mask.unsqueeze(1)
    size_l1 = (F.l1_loss(r[:, :2], reg[:, :2], reduction="none") * m).sum() / n
    off_l1 = (F.l1_loss(r[:, 2:], reg[:, 2:], reduction="none") * m).sum() / n
    return focal + 0.1 * size_l1 + off_l1


def evaluate_model(model: Detector, data: DetectionSet, score_threshold: float = 0.3) -> dict:
    """COCO metrics of the PyTorch model on a split (decode as in the exported graph)."""
    wrapped = DetectorWithDecode(model).eval()

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
    model: Detector,
    cfg: TrainCfg,
    *,
    train: DetectionSet,
    val: DetectionSet,
    epochs: int,
    lr: float,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "epoch",
) -> tuple[Detector, list[dict]]:
    """The training loop shared by train, prune (fine-tune) and distill.

    `cfg` supplies batch size, weight decay, augmentation, AMP, device, threads and seed;
    `extra_loss(raw, x)` is added to the detection loss (distillation uses it). After each epoch
    `on_epoch(row)` gets {epoch, train_loss, val_map50, val_map50_95}. Returns the model on the
    CPU in eval mode and the per-epoch rows.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    num_classes = model.cfg.num_classes
    model.to(device).requires_grad_(True)  # a copy of a frozen model (e.g. a teacher) trains too
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    size = model.cfg.input_size
    aug = augmenter(cfg.augment, size, size, cfg.seed)
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
            targets = make_targets(boxes, labels, num_classes, model.cfg.input_size)
            heat, reg, mask = (t.to(device) for t in targets)
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                raw = model(x)
                extra = extra_loss(raw, x) if extra_loss else None
            loss = detection_loss(raw, heat, reg, mask, num_classes)
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
        val_metrics = evaluate_model(model, val)
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


def run(cfg: TrainCfg, *, train: DetectionSet, val: DetectionSet, on_epoch=None):
    """Train a detector from scratch. Returns (model on CPU, per-epoch history rows)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = Detector(DetectorConfig(len(train.categories), cfg.input_size, cfg.width, cfg.depth))
    return fit(model, cfg, train=train, val=val, epochs=cfg.epochs, lr=cfg.lr, on_epoch=on_epoch)


def save_checkpoint(path: Path, model: Detector, categories: list[dict], extra: dict) -> None:
    """Write {config, state_dict, categories, ...} atomically (temp file, then rename)."""
    buf = io.BytesIO()
    torch.save(
        {
            "config": model.cfg.to_dict(),
            "state_dict": model.state_dict(),
            "categories": categories,
            **extra,
        },
        buf,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/train")),
) -> None:
    """Train the FP32 detector on the cleaned manifest."""
    with stage_entry("train", params) as ctx:
        cfg = ctx.params.train
        ctx.log_params(cfg)
        for stale in ("model.pt", "metrics.json", "meta.json", "plots/curves.csv"):
            remove(out / stale)
        m = read_manifest(manifest)
        check_min_boxes(m, manifest, "train", cfg.min_boxes, "train.min_boxes")
        m, train, val = load_splits(manifest, cfg.input_size)
        log.info("train: %d images, val: %d images", len(train), len(val))

        model, history = run(cfg, train=train, val=val, on_epoch=ctx.log_epoch)
        macs, n_params = macs_and_params(model)
        final = evaluate_model(model, val, ctx.params.evaluate.score_threshold)
        metrics = {
            "val_map50": final["map50"],
            "val_map50_95": final["map50_95"],
            "train_loss": history[-1]["train_loss"],
            "macs": macs,
            "params": n_params,
        }
        save_checkpoint(
            out / "model.pt",
            model,
            m["splits"]["train"]["categories"],
            {"train_cfg": cfg.model_dump(mode="json"), "metrics": metrics},
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        write_text(out / "plots" / "curves.csv", buf.getvalue())
        write_json(out / "meta.json", meta(cfg, {"manifest": manifest}, ("pycocotools",)))
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics({"macs": macs, "params": n_params})  # the rest is the last epoch's
        ctx.log_artifact(out / "plots" / "curves.csv", "plots")


if __name__ == "__main__":
    app()
