"""The training loop every PyTorch stage shares (train, prune's fine-tune, distill, QAT, label
QA's cross-fit), for any model family: the family's adapter supplies forward pass and loss.

Mixed precision (`autocast_dtype`: fp16 + GradScaler on CUDA, bf16 autocast on a CPU with bf16
instructions, float32 on other CPUs unless asked), seeded, AdamW with a one-cycle
schedule, box-aware augmentation (tasks/preprocess/augment.py). Each epoch ends with val mAP
computed on the deployable graph's decode (`evaluate_model`); with an `EarlyStop` the loop
ends once val mAP@0.5 stops improving and hands back the best epoch's weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
from torch.nn.utils import parametrize
from tqdm import tqdm

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import DistillCfg, TrainCfg
from tasks.metrics.detection import coco_map, predict
from tasks.models.base import ModelAdapter
from tasks.preprocess.augment import augmenter
from tasks.preprocess.letterbox import input_wh

log = logging.getLogger(__name__)


def evaluate_model(adapter: ModelAdapter, model: nn.Module, data: DetectionSet) -> dict:
    """{map50, map50_95} of the PyTorch model on a split (decode as in the exported graph).

    Runs a BatchNorm-folded copy (`deployable(fold=True)`): the same detections to float
    rounding (val mAP@0.5 equal to 5 decimals on the default teacher) in ~20% less time, which
    every epoch's validation pays. A model under QAT (fake-quantized weights as
    parametrizations, fake-quant modules) is run as it is: folding would quantize other
    weights than the ones it trains."""
    fold = not any(
        parametrize.is_parametrized(m) or isinstance(m, FakeQuantizeBase) for m in model.modules()
    )
    wrapped = adapter.deployable(model, max_detections=100, score_floor=0.01, fold=fold)

    def runner(x: np.ndarray):
        with torch.inference_mode():
            return [t.numpy() for t in wrapped(torch.from_numpy(x))]

    was_training = model.training
    model.eval()
    result = coco_map(data.coco, predict(runner, data))
    model.train(was_training)
    return result


class EarlyStop:
    """Early stopping on val mAP@0.5 (the `patience` / `min_delta` params of train, distill and
    prune's fine-tune).

    An epoch counts as progress when its val mAP@0.5 exceeds the last progress epoch's by more
    than `min_delta` (the first epoch always does); after `patience` epochs in a row without
    progress the loop stops. The weights kept are those of the highest val mAP@0.5 seen (a tie
    goes to the later, further-annealed epoch), whether or not it counted as progress, and are
    loaded back at the end whether the loop stopped or ran every epoch. The one-cycle schedule
    is planned for the full `epochs`, so a stop ends it early.
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, found {patience}")
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.last_epoch = 0
        self.waited = 0
        self.stopped = False
        self._progress: float | None = None
        self._best_state: dict | None = None

    def update(self, epoch: int, value: float, model: nn.Module | None = None) -> bool:
        """Record epoch `epoch`'s val mAP@0.5; True when the loop should stop after it."""
        self.last_epoch = epoch
        if self.best is None or value >= self.best:
            self.best, self.best_epoch = value, epoch
            if model is not None:
                self._best_state = copy.deepcopy(model.state_dict())
        if self._progress is None or value > self._progress + self.min_delta:
            self._progress, self.waited = value, 0
            return False
        self.waited += 1
        self.stopped = self.waited >= self.patience
        return self.stopped

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model` (nothing recorded: unchanged)."""
        if self._best_state is not None:
            model.load_state_dict(self._best_state)

    def summary(self, epochs: int) -> dict:
        """What the stop records in metrics: the epoch it stopped at, the best epoch (whose
        weights the model holds) and why it ended, out of the `epochs` planned."""
        if self.stopped:
            reason = (
                f"patience: no val mAP@0.5 gain > {self.min_delta:g} in {self.patience} "
                f"epochs after epoch {self.last_epoch - self.patience}"
            )
        else:
            reason = f"epochs: ran all {epochs}"
        return {
            "epochs_planned": epochs,
            "stopped_epoch": self.last_epoch,
            "best_epoch": self.best_epoch,
            "best_val_map50": self.best,
            "stop_reason": reason,
        }


def pick_device(cfg: TrainCfg) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AMX tiles or AVX512-BF16), as oneDNN's bf16 kernels
    need to beat float32. torch exposes the checks only as private helpers: without them, False
    (float32 is correct everywhere, only slower where bf16 would have paid)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(cfg: TrainCfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `fit` trains in (None: float32). `train.amp: auto` (the default) uses
    fp16 on CUDA and bf16 on a CPU only where `cpu_has_bf16`: on a 2-core AVX2-only EPYC a
    training step of the built-in detector took 26.5 s in bf16 against 1.44 s in float32
    (width 2.0, batch 32, 128 px). `amp: true` forces it, `false` turns it off."""
    if cfg.amp is False:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cfg.amp is True or cpu_has_bf16() else None


def precision_of(dtype: torch.dtype | None) -> str:
    """`autocast_dtype`'s answer as metrics record it: bfloat16, float16 or float32."""
    return str(dtype or torch.float32).removeprefix("torch.")


def kd_loss_fn(
    adapter: ModelAdapter,
    teacher: nn.Module,
    cfg: DistillCfg,
    train_cfg: TrainCfg,
    extra: Callable[[], torch.Tensor] | None = None,
) -> Callable[[object, torch.Tensor], torch.Tensor]:
    """`fit`'s `extra_loss` for knowledge distillation from `teacher` (distill and QAT).

    Freezes the teacher (eval mode, no gradients) and moves it to the device `fit` trains on
    (`pick_device(train_cfg)`; the caller moves it back). The loss of a batch `x` whose student
    outputs are `raw`: the family's `kd_loss` against the teacher's outputs on `x`, at
    `cfg.temperature`, `cfg.kd_weight` and `cfg.reg_weight`, plus `extra()` when given (distill's
    feature term, which reads the hooks this forward pass filled).
    """
    teacher.eval().requires_grad_(False)
    teacher.to(pick_device(train_cfg))

    def loss(raw, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = adapter.forward_train(teacher, x)
        kd = adapter.kd_loss(raw, target, cfg.temperature, cfg.kd_weight, cfg.reg_weight)
        return kd if extra is None else kd + extra()

    return loss


def fit(
    adapter: ModelAdapter,
    model: nn.Module,
    cfg: TrainCfg,
    *,
    train: DetectionSet,
    val: DetectionSet | None,
    epochs: int,
    lr: float,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    desc: str = "epoch",
    early_stop: EarlyStop | None = None,
) -> tuple[nn.Module, list[dict]]:
    """The training loop shared by train, prune (fine-tune) and distill.

    `cfg` supplies batch size, weight decay, augmentation, AMP, device, threads and seed; the
    family's `adapter` supplies the forward pass and the loss. `extra_loss(raw, x)` is added to
    the detection loss (distillation uses it). After each epoch
    `on_epoch(row)` gets {epoch, train_loss, val_map50, val_map50_95} (no val_* with `val`
    None: no per-epoch evaluation, and then no `early_stop`). With `early_stop` the
    loop may end before `epochs` and the model gets the best epoch's weights (see `EarlyStop`;
    its `summary` says where and why). Returns the model on the CPU in eval mode and the
    per-epoch rows (one per epoch run).
    """
    if early_stop is not None and val is None:
        raise ValueError("fit: early stopping needs a val set")
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
    amp_dtype = autocast_dtype(cfg, device)
    log.info("%s: training on %s in %s", desc, device.type, precision_of(amp_dtype))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
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
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
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
        row = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if val is not None:
            model.cpu()
            val_metrics = evaluate_model(adapter, model, val)
            model.to(device)
            row |= {"val_map50": val_metrics["map50"], "val_map50_95": val_metrics["map50_95"]}
            log.info(
                "%s %d: loss %.4f  val mAP@0.5 %.4f",
                *(desc, epoch, row["train_loss"], row["val_map50"]),
            )
        else:
            log.info("%s %d: loss %.4f", desc, epoch, row["train_loss"])
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if early_stop is not None and early_stop.update(epoch, row["val_map50"], model):
            log.info("%s: %s", desc, early_stop.summary(epochs)["stop_reason"])
            break
    model.cpu()
    if early_stop is not None:
        early_stop.restore(model)
    return model.eval(), history


def early_stop_for(patience: int | None, min_delta: float) -> EarlyStop | None:
    """The `EarlyStop` a stage's `patience` / `min_delta` params ask for (None: off)."""
    return EarlyStop(patience, min_delta) if patience else None
