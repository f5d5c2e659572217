"""Quantization-aware fine-tuning, the `quantize.qat_epochs` option.

torch's own fake-quant modules (`torch.ao.quantization.FakeQuantize` with its moving-average
min/max observers) simulate what the ONNX Runtime QDQ export does to every convolution:
symmetric per-channel INT8 weights and per-tensor UINT8 (or symmetric INT8) activations at
its input. The model is fine-tuned through them for a few epochs with the distillation loss
against the FP32 teacher, then the fake-quant modules are taken off again. The quantize stage
exports and calibrates the tuned weights exactly as it does without QAT, so QAT changes which
weights the QDQ model is built from, not the format every engine reads.

BatchNorm stays as it is during the fine-tune and is folded at export. Folding scales each
output channel of a weight, and a per-channel symmetric grid scales with it, so the weight
rounding simulated here is the one the folded model gets.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
from torch.nn.utils import parametrize

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import DistillCfg, QuantizeCfg, TrainCfg
from tasks.models import ModelAdapter
from tasks.models.training import fit, pick_device


class _WeightFakeQuant(nn.Module):
    """A weight parametrization: the conv sees its weight rounded to the INT8 per-channel grid
    (straight-through gradients, from FakeQuantize)."""

    def __init__(self) -> None:
        super().__init__()
        self.fq = FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fq(weight.float()).to(weight.dtype)


def _activation_fake_quant(symmetric: bool) -> FakeQuantize:
    if symmetric:
        return FakeQuantize(
            observer=MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )


def attach(model: nn.Module, cfg: QuantizeCfg) -> list[nn.Module]:
    """Put fake-quant on the weight and the input of every conv. Returns the convs, for
    `detach`."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        parametrize.register_parametrization(conv, "weight", _WeightFakeQuant())
        conv.act_fq = _activation_fake_quant(cfg.activation_type == "qint8")
        conv.act_hook = conv.register_forward_pre_hook(
            lambda m, args: (m.act_fq(args[0].float()).to(args[0].dtype),)
        )
    return convs


def detach(convs: list[nn.Module]) -> None:
    """Take the fake-quant modules off: plain float weights (the tuned shadow weights) and no
    hooks, so the state dict is a normal checkpoint's again."""
    for conv in convs:
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
        conv.act_hook.remove()
        del conv.act_fq, conv.act_hook


def finetune(
    adapter: ModelAdapter,
    student: nn.Module,
    teacher: nn.Module,
    cfg: QuantizeCfg,
    distill_cfg: DistillCfg,
    train_cfg: TrainCfg,
    *,
    train: DetectionSet,
    val: DetectionSet,
) -> tuple[nn.Module, list[dict]]:
    """`cfg.qat_epochs` of distillation through fake-quant. Returns the tuned float model and
    the per-epoch rows (val mAP measured with fake-quant on)."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.to(pick_device(train_cfg))  # the device the loop trains the student on

    def extra(raw, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = adapter.forward_train(teacher, x)
        d = distill_cfg
        return adapter.kd_loss(raw, target, d.temperature, d.kd_weight, d.reg_weight)

    convs = attach(student, cfg)
    tuned, rows = fit(
        adapter,
        student,
        # fake-quant needs float32 activations: no bf16 autocast while it is on
        train_cfg.model_copy(update={"amp": False}),
        train=train,
        val=val,
        epochs=cfg.qat_epochs,
        lr=cfg.qat_lr,
        extra_loss=extra,
        desc="QAT",
    )
    detach(convs)
    teacher.cpu()
    return tuned, rows
