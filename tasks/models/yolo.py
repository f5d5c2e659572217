"""The Ultralytics YOLO family (YOLOv8 / YOLO11 detect models) behind the `ModelAdapter` seam.

Ultralytics is the optional `yolo` extra (AGPL-3.0). This module switches it offline before it is
first imported (`_ultralytics()`): no network checks, no pip auto-install, no telemetry, quiet.

What the family owns:
- the model: an Ultralytics `DetectionModel`, built from a model yaml (`model.yolo.yaml`) with
  `nc` = the data's classes, or unpickled from the user's `model.weights` (that path only; its MD5
  is recorded). Every `C2f` / `C3k2` is rewritten once (`split_c2f`) so that its first conv is two
  convs instead of one conv + `chunk(2)`: the same function, but torch-pruning can prune the two
  halves independently and the rebuilt model needs no split sizes.
- the checkpoint: {family, config: {yaml, nc, input_size, widths, weights_md5}, state_dict,
  categories, **extra}; `widths` holds every conv's (in, out, groups) and every BatchNorm's
  width, so `load` rebuilds a pruned model exactly from a weights-only file.
- training: the raw head output is Ultralytics' dict {"boxes": (B, 4*reg_max, A) DFL logits,
  "scores": (B, C, A) class logits, "feats": per-level maps}; `loss` is Ultralytics'
  `v8DetectionLoss` with its default gains (box 7.5, cls 0.5, dfl 1.5).
- deployment: decode (DFL + anchors, Ultralytics' functions) and batched class-aware NMS
  (`tasks.models.nms`, exported as one ONNX `NonMaxSuppression`) inside the graph, ending in the
  project's `OUTPUTS`.
"""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.harness.errors import ConfigError, DataError
from tasks.harness.io import md5_file
from tasks.models.base import PruneSpec
from tasks.models.config import ModelCfg
from tasks.models.ultralytics_offline import offline_env, offline_ultralytics
from tasks.models.yolo_graph import (
    YoloWithNms,
    apply_widths,
    check_supported,
    conv_widths,
    detect_head,
    split_c2f,
)
from tasks.preprocess.letterbox import input_wh

log = logging.getLogger(__name__)

FAMILY = "yolo"
MAX_STRIDE = 32  # P5 models: the input side must be a multiple of the largest stride

offline_env()  # on import of this module, so that it precedes Ultralytics' own first import


def _ultralytics():
    """Ultralytics, imported offline (tasks/models/ultralytics_offline.py). Returns the
    `ultralytics` module; ConfigError when the `yolo` extra is not installed."""
    try:
        return offline_ultralytics()
    except ImportError as e:
        raise ConfigError(
            "params.yaml: model.family: yolo needs Ultralytics: pip install 'shrinkflow[yolo]'"
        ) from e


def _set_hyp(model: nn.Module) -> None:
    """Give the model Ultralytics' default hyperparameters (the loss gains box 7.5, cls 0.5,
    dfl 1.5), as its trainer does; a user's checkpoint carries its training args as a dict."""
    from ultralytics.cfg import get_cfg

    model.args = get_cfg()


def weights_md5(cfg: ModelCfg) -> str | None:
    """MD5 of the user's `model.weights` file (the lineage record), None when building from yaml."""
    return md5_file(Path(cfg.weights)) if cfg.weights else None


def _load_user_weights(path: Path, num_classes: int) -> nn.Module:
    """Unpickle the user's Ultralytics checkpoint at `path` (only this path: it runs code) and
    return its detection model in float32. Raises DataError when it is not one we support."""
    if not path.is_file():
        raise DataError(f"{path}: model.weights: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (unpickling raises many types)
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(
            f"{path}: not a readable Ultralytics checkpoint ({type(e).__name__}: {first})"
        ) from e
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") or ckpt.get("model")
    elif isinstance(ckpt, nn.Module):
        model = ckpt
    if not isinstance(model, nn.Module):
        raise DataError(
            f"{path}: expected an Ultralytics checkpoint (a dict with 'model'), "
            f"found {type(ckpt).__name__}"
        )
    check_supported(model, str(path))
    found = detect_head(model).nc
    if found != num_classes:
        raise DataError(
            f"{path}: the model has {found} classes, the data has {num_classes}; "
            "train it on these categories or change the data"
        )
    return model.float()


@dataclass(frozen=True)
class YoloAdapter:
    """The `ModelAdapter` of Ultralytics YOLOv8 / YOLO11 detect models."""

    cfg: ModelCfg
    family: str = FAMILY
    input_stride: int = MAX_STRIDE

    # -- build, save, load -------------------------------------------------------------------
    def build(self, num_classes: int, input_size: int | tuple[int, int], seed: int) -> nn.Module:
        """A YOLO detection model in train mode: the user's `model.weights` if set, else the
        `model.yolo.yaml` architecture with `nc = num_classes`, initialised from `seed`.

        Raises ConfigError for an input size that is not a multiple of 32 or an unknown yaml;
        DataError for weights that are not a supported detection model or whose class count
        differs from the data's."""
        _ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        w, h = input_wh(input_size)
        for side in dict.fromkeys((w, h)):
            if side % MAX_STRIDE:
                near = max(MAX_STRIDE, round(side / MAX_STRIDE) * MAX_STRIDE)
                raise ConfigError(
                    f"params.yaml: input size {side} is not a multiple of {MAX_STRIDE} "
                    f"(YOLO's largest stride); use e.g. {near}"
                )
        md5 = None
        if self.cfg.weights:
            path = Path(self.cfg.weights)
            model = _load_user_weights(path, num_classes)
            md5 = md5_file(path)
            log.info("yolo: %s (md5 %s)", path, md5)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    model = DetectionModel(self.cfg.yolo.yaml, nc=num_classes, verbose=False)
                except (FileNotFoundError, KeyError, ValueError) as e:
                    raise ConfigError(
                        f"params.yaml: model.yolo.yaml: {self.cfg.yolo.yaml!r} is "
                        f"not a usable Ultralytics model yaml ({e})"
                    ) from e
            try:
                check_supported(model, f"params.yaml: model.yolo.yaml {self.cfg.yolo.yaml!r}")
            except DataError as e:  # a yaml is config, not data
                raise ConfigError(str(e)) from None
        split_c2f(model)
        _set_hyp(model)
        model.shrinkflow = {"input_size": _side(w, h), "weights_md5": md5}
        for p in model.parameters():
            p.requires_grad_(True)
        detect_head(model).dfl.requires_grad_(False)  # DFL: the fixed 0..reg_max-1 projection
        return model.train()

    def save(self, path: Path, model: nn.Module, categories: list[dict], extra: dict) -> None:
        """Write the checkpoint (see the module docstring) atomically: temp file, then rename."""
        config = {
            "yaml": copy.deepcopy(model.yaml),
            "nc": int(detect_head(model).nc),
            "input_size": _side(*self.input_size(model)),
            "widths": conv_widths(model),
            "weights_md5": model.shrinkflow.get("weights_md5"),
        }
        ckpt = {
            "family": FAMILY,
            "config": config,
            "state_dict": model.state_dict(),
            "categories": categories,
            **extra,
        }
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    def load(self, ckpt: dict, path: Path) -> nn.Module:
        """Rebuild the model (eval mode) from a weights-only checkpoint dict: the recorded yaml,
        the C2f rewrite, the recorded (pruned) widths, then the state_dict."""
        _ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        family = ckpt.get("family") if isinstance(ckpt, dict) else None
        config = ckpt.get("config") if isinstance(ckpt, dict) else None
        if family != FAMILY or not isinstance(config, dict):
            raise DataError(f"{path}: not a yolo-family checkpoint (family {family!r})")
        try:
            model = DetectionModel(copy.deepcopy(config["yaml"]), nc=config["nc"], verbose=False)
            split_c2f(model)
            apply_widths(model, config["widths"])
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise DataError(f"{path}: checkpoint does not match its config: {first}") from e
        _set_hyp(model)
        model.shrinkflow = {
            "input_size": _side(*input_wh(config["input_size"])),
            "weights_md5": config.get("weights_md5"),
        }
        detect_head(model).dfl.requires_grad_(False)
        return model.eval()

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return input_wh(model.shrinkflow["input_size"])

    def num_classes(self, model: nn.Module) -> int:
        return int(detect_head(model).nc)

    # -- training ----------------------------------------------------------------------------
    def forward_train(self, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
        """Ultralytics' raw head dict {"boxes", "scores", "feats"}; in eval mode (a teacher) the
        same dict, taken from the (decoded, raw) pair the model returns."""
        out = model(x)
        return out[1] if isinstance(out, tuple) else out

    def loss(
        self, model: nn.Module, raw: dict, boxes: list[np.ndarray], labels: list[np.ndarray]
    ) -> torch.Tensor:
        """Ultralytics' `v8DetectionLoss` (box 7.5 * CIoU + cls 0.5 * BCE + dfl 1.5 * DFL), per
        image: the sum of its three gained terms, not multiplied by the batch size as
        Ultralytics' trainer does. Computed in float32 (safe under bf16 autocast)."""
        from ultralytics.utils.loss import v8DetectionLoss

        # v8DetectionLoss scales normalised xywh back by the feature maps' (w, h, w, h)
        size = torch.tensor(self.input_size(model) * 2, dtype=torch.float32)
        preds = {k: (v.float() if k != "feats" else [f.float() for f in v]) for k, v in raw.items()}
        device = preds["scores"].device
        idx, cls, xywh = [], [], []
        for i, (b, c) in enumerate(zip(boxes, labels, strict=True)):
            b = torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4))
            centre, wh = (b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]
            xywh.append(torch.cat([centre, wh], 1) / size)  # normalised xywh, Ultralytics' batch
            cls.append(torch.as_tensor(np.asarray(c, np.float32).reshape(-1)))
            idx.append(torch.full((len(b),), float(i)))
        batch = {
            "batch_idx": torch.cat(idx).to(device),
            "cls": torch.cat(cls).to(device),
            "bboxes": torch.cat(xywh).to(device),
        }
        with torch.autocast(device.type, enabled=False):
            total, _ = v8DetectionLoss(model).loss(preds, batch)
        return total.sum() / preds["scores"].shape[0]

    def kd_loss(
        self,
        student_raw: dict,
        teacher_raw: dict,
        temperature: float,
        cls_weight: float,
        box_weight: float,
    ) -> torch.Tensor:
        """Per-anchor distillation, weighted by the teacher's confidence (its top class
        probability, so background anchors count little): class logits as Bernoulli soft
        targets (KL of sigmoid(t/T) to sigmoid(s/T), summed over classes) and the DFL box
        distributions (softmax KL over the reg_max bins of each side, mean over the 4 sides),
        both scaled by T^2 (Hinton et al., 2015). Float32 throughout."""
        s_cls, t_cls = student_raw["scores"].float(), teacher_raw["scores"].float().detach()
        s_box, t_box = student_raw["boxes"].float(), teacher_raw["boxes"].float().detach()
        if s_cls.shape != t_cls.shape or s_box.shape != t_box.shape:
            raise ConfigError(
                f"distill: student and teacher outputs differ: scores "
                f"{tuple(s_cls.shape)} vs {tuple(t_cls.shape)}, boxes "
                f"{tuple(s_box.shape)} vs {tuple(t_box.shape)} (same classes and "
                "input size needed)"
            )
        t = float(temperature)
        weight = t_cls.sigmoid().amax(1)  # (B, A) teacher confidence
        norm = weight.sum().clamp(min=1e-6)
        target = (t_cls / t).sigmoid()
        # Bernoulli KL = BCE(student, p) - BCE(teacher, p): zero when the logits agree
        kl_cls = F.binary_cross_entropy_with_logits(s_cls / t, target, reduction="none")
        kl_cls = kl_cls - F.binary_cross_entropy_with_logits(t_cls / t, target, reduction="none")
        cls_term = (kl_cls.sum(1) * weight).sum() / norm
        b, c, a = s_box.shape  # (B, 4 * reg_max, A)
        log_s = (s_box.view(b, 4, c // 4, a) / t).log_softmax(2)
        log_t = (t_box.view(b, 4, c // 4, a) / t).log_softmax(2)
        kl_box = (log_t.exp() * (log_t - log_s)).sum(2).mean(1)  # (B, A)
        box_term = (kl_box * weight).sum() / norm
        return (cls_weight * cls_term + box_weight * box_term) * t * t

    # -- pruning -----------------------------------------------------------------------------
    def prunable(self, model: nn.Module) -> list[str]:
        """Paths of the model's Ultralytics `Conv` blocks (conv + BN + SiLU), e.g. 'model.2.cv0'."""
        from ultralytics.nn.modules import Conv

        return [name for name, m in model.named_modules() if isinstance(m, Conv)]

    def prune_spec(self, model: nn.Module, ignore: list[str]) -> PruneSpec:
        """Keep the head's outputs (each level's last box and class conv, and the DFL), the
        attention blocks (C2PSA: heads and key sizes tie their widths) and the user's
        `prune.ignore` modules; everything else is MetaPruner's to prune."""
        from ultralytics.nn.modules.block import C2PSA, Attention, PSABlock

        head = detect_head(model)
        keep: list[nn.Module] = [head.dfl]
        keep += [branch[-1] for branch in (*head.cv2, *head.cv3)]
        keep += [m for m in model.modules() if isinstance(m, C2PSA | PSABlock | Attention)]
        modules = dict(model.named_modules())
        for name in ignore:
            if name not in modules:
                raise ConfigError(
                    f"params.yaml: prune.ignore: {name!r} is not a module of this "
                    f"yolo model; e.g. {', '.join(self.prunable(model)[:3])}"
                )
            keep.append(modules[name])
        return PruneSpec(ignored_layers=keep)

    def after_prune(self, model: nn.Module) -> None:
        """Nothing to record beyond the modules themselves: `save` reads every conv's and
        BatchNorm's width from the live model. Checks that torch-pruning left each conv's
        declared channels equal to its weight's (what `load` rebuilds from)."""
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                shape = (m.out_channels, m.in_channels // m.groups)
                if tuple(m.weight.shape[:2]) != shape:
                    raise RuntimeError(
                        f"yolo: pruned conv {name} declares {shape}, weight "
                        f"has {tuple(m.weight.shape[:2])}"
                    )

    # -- deployment --------------------------------------------------------------------------
    def deployable(
        self, model: nn.Module, max_detections: int, score_floor: float, fold: bool = True
    ) -> nn.Module:
        """An eval-mode copy (BatchNorm fused by Ultralytics' `fuse()` when `fold`) that decodes
        and runs class-aware NMS in the graph; see `YoloWithNms`."""
        net = copy.deepcopy(model).eval()
        if fold:
            net.fuse(verbose=False)
        return YoloWithNms(net, self.input_size(model), max_detections, score_floor).eval()

    def macs_and_params(self, model: nn.Module) -> tuple[int, int]:
        """MACs at `input_size` for batch 1 (eval mode, BN unfused) and parameter count."""
        import torch_pruning as tp

        w, h = self.input_size(model)
        was_training = model.training
        model.eval()
        try:
            macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, h, w))
        finally:
            model.train(was_training)
        return int(macs), int(params)


def _side(w: int, h: int) -> int | list[int]:
    """The checkpoint's `input_size`: one side for a square (as before), else [w, h]."""
    return int(w) if w == h else [int(w), int(h)]


def adapter(cfg: ModelCfg) -> YoloAdapter:
    """The registry's entry point (`tasks.models.FAMILIES["yolo"]`)."""
    return YoloAdapter(cfg)
