"""Sections of the PyTorch stages: `train` (with its typed `augment` steps), `prune`,
`distill`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from tasks.harness.sections import InputSize, PosInt, Rate, Section


class _Aug(Section):
    p: Rate = Field(0.5, description="probability the step is applied to an image")


class ShiftAug(_Aug):
    """Translate by whole pixels (zero fill); boxes follow, mostly-hidden ones are dropped."""

    kind: Literal["shift"]
    fraction: float = Field(0.125, ge=0, le=0.5, description="largest shift, share of the side")


class HFlipAug(_Aug):
    """Mirror left-right (wrong for classes that are mirror-sensitive, e.g. digits)."""

    kind: Literal["hflip"]


class VFlipAug(_Aug):
    """Mirror top-bottom (aerial or microscope views)."""

    kind: Literal["vflip"]


class ScaleJitterAug(_Aug):
    """Zoom in or out about the centre, aspect ratio kept."""

    kind: Literal["scale_jitter"]
    range: tuple[float, float] = Field((0.75, 1.25), description="min, max zoom factor")


class HsvAug(_Aug):
    """Photometric jitter. `hue` stays 0 by default, so colours keep their meaning."""

    kind: Literal["hsv"]
    hue: float = Field(0.0, ge=0, le=0.5, description="largest hue shift, share of the circle")
    saturation: float = Field(0.3, ge=0, le=1, description="largest relative saturation change")
    value: float = Field(0.3, ge=0, le=1, description="largest relative brightness change")


class ChannelShuffleAug(_Aug):
    """Permute R, G, B: only for data whose classes are not told apart by colour."""

    kind: Literal["channel_shuffle"]


class MosaicAug(_Aug):
    """Four training images in a 2x2 mosaic at the input size (always applied first)."""

    kind: Literal["mosaic"]


AugmentStep = Annotated[
    ShiftAug | HFlipAug | VFlipAug | ScaleJitterAug | HsvAug | ChannelShuffleAug | MosaicAug,
    Field(discriminator="kind"),
]


class TrainCfg(Section):
    seed: int = Field(0, description="torch / numpy seed")
    epochs: PosInt = Field(30, description="training epochs")
    patience: PosInt | None = Field(
        None,
        description="early stopping: end training after this many epochs in a row without a "
        "val mAP@0.5 gain over `min_delta`, and keep the highest val mAP@0.5 epoch's weights "
        "(also when it runs every epoch); null = off (every epoch, the last epoch's weights)",
    )
    min_delta: float = Field(
        0.0, ge=0, description="early stopping: the smallest val mAP@0.5 gain that counts"
    )
    batch_size: PosInt = Field(32)
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW, one-cycle)")
    weight_decay: float = Field(1e-4, ge=0)
    input_size: InputSize = Field(
        (128, 128),
        description="model input, px: one side (a square, e.g. 128) or [width, height] (e.g. "
        "[320, 256]); each side a multiple of the model family's stride (centernet 16, yolo "
        "32). Note the order: [w, h] like PIL and the letterbox, not Ultralytics' imgsz [h, w]",
    )
    amp: bool | Literal["auto"] = Field(
        "auto",
        description="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU. auto: on "
        "CUDA, and on a CPU only where it has bf16 instructions (AMX or AVX512-BF16); elsewhere "
        "bf16 is emulated and a training step measured 8-18x slower than float32 (README)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    threads: PosInt = Field(2, description="torch intra-op threads on CPU")
    min_boxes: PosInt = Field(
        1, description="fewest boxes the cleaned train split may hold (fewer is an error)"
    )
    augment: list[AugmentStep] = Field(
        default_factory=lambda: [ShiftAug(kind="shift", p=1.0)],
        description="box-aware training augmentation (albumentations), applied in order, each "
        "with its probability `p`: shift, hflip, vflip, scale_jitter, hsv, channel_shuffle, "
        "mosaic; [] = none",
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_switch(cls, v):
        """`true` / `false` (the earlier switch): the default list / none."""
        if isinstance(v, bool):
            return [{"kind": "shift", "p": 1.0}] if v else []
        return v


class PruneCfg(Section):
    """Structured channel pruning with torch-pruning (DepGraph, Fang et al., CVPR 2023)."""

    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        "l1", description="channel importance criterion (registered in tasks/prune.py)"
    )
    macs_reduction: float = Field(0.5, gt=0, lt=0.95, description="target share of MACs removed")
    global_pruning: bool = Field(False, description="rank channels across layers, not per layer")
    steps: PosInt = Field(2, description="iterative pruning steps, each followed by a fine-tune")
    finetune_epochs: int = Field(2, ge=0, description="fine-tune epochs after each step")
    patience: PosInt | None = Field(
        None,
        description="early stopping in each fine-tune (as train.patience: epochs without a val "
        "mAP@0.5 gain over `min_delta`; the best epoch's weights kept); null = off",
    )
    min_delta: float = Field(
        0.0, ge=0, description="early stopping: the smallest val mAP@0.5 gain that counts"
    )
    lr: float = Field(1e-3, gt=0, description="fine-tune peak learning rate")
    round_to: int = Field(8, ge=1, description="keep channel counts multiples of this (SIMD)")
    ignore: list[str] = Field(
        [],
        description="module paths left unpruned, beside those the model family protects (its "
        "output convs)",
    )
    target: Literal["macs_reduction", "latency_ms", "speedup"] = Field(
        "macs_reduction",
        description="what pruning stops at: `macs_reduction` (in `steps` equal steps), or a "
        "latency measured on `engine` at each step of `search_step`: `latency_ms` (batch-1 "
        "p50 at most this) or `speedup` (unpruned p50 / pruned p50 at least this); "
        "`macs_reduction` is then the most it may remove",
    )
    latency_ms: float | None = Field(
        None, gt=0, description="the batch-1 p50 latency to reach (target: latency_ms)"
    )
    speedup: float | None = Field(
        None, gt=1, description="the speedup over the unpruned model to reach (target: speedup)"
    )
    engine: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime",
        description="engine target each step is exported to and timed on (FP32, the "
        "build_engine threads/precision settings)",
    )
    search_step: float = Field(
        0.1,
        gt=0,
        lt=0.95,
        description="share of the current MACs removed per measured step (latency targets): "
        "equal relative steps, so the speedup climbs in even steps and the last ones are fine",
    )
    max_map_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="stop at the largest step whose fine-tuned val mAP@0.5 is at most this "
        "below the unpruned model's (0.02 = 2 points); null = no accuracy bound",
    )
    latency_warmup: int = Field(5, ge=0, description="untimed calls before each timed block")
    latency_runs: PosInt = Field(30, description="timed batch-1 calls per model and step")
    latency_rounds: PosInt = Field(3, description="shuffled timing blocks per step")

    @model_validator(mode="after")
    def _target_value(self) -> PruneCfg:
        if self.target != "macs_reduction" and getattr(self, self.target) is None:
            raise ValueError(f"target {self.target} needs a value: set prune.{self.target}")
        return self


class DistillCfg(Section):
    """Knowledge distillation: teacher = trained model, student = pruned model."""

    epochs: PosInt = Field(8, description="student training epochs")
    patience: PosInt | None = Field(
        None,
        description="early stopping of the student (and the no-KD control), as "
        "train.patience: epochs without a val mAP@0.5 gain over `min_delta`; the best epoch's "
        "weights kept; null = off",
    )
    min_delta: float = Field(
        0.0, ge=0, description="early stopping: the smallest val mAP@0.5 gain that counts"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    temperature: float = Field(2.0, gt=0, description="softens both heatmaps (Hinton et al.)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the per-pixel heatmap KD loss")
    reg_weight: float = Field(0.1, ge=0, description="weight of the size/offset KD loss")
    feature_stage: str | None = Field(
        None,
        description="also distil this block's features (e.g. 'stages.1', 'smooth1') through "
        "a 1x1 adapter; null = off",
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature KD loss")
    control: bool = Field(
        True, description="also fine-tune the pruned model without KD, to measure KD's value"
    )
