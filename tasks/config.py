"""Typed, validated params.yaml: one pydantic model per stage, unknown keys rejected.

`load_params` is called by every entry point before any work; a bad file raises ConfigError whose
message reads `params.yaml: <key.path>: <problem>`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.config_types import NonNegInt, PosInt, SafePath, Section  # noqa: F401
from tasks.errors import ConfigError
from tasks.models.config import ModelCfg

Side = Annotated[int, Field(ge=32, le=1024)]  # one side of the model input, px


def _side_or_rectangle(v):
    """`128` is the square (128, 128); `[320, 256]` is (width, height)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) != 2:
        raise ValueError(f"expected one side or [width, height], found {list(v)}")
    return v


# a model input, px: one side (a square) or [width, height]; read as (width, height)
InputSize = Annotated[tuple[Side, Side], BeforeValidator(_side_or_rectangle)]


def stride_problem(key: str, size: tuple[int, int], stride: int, family: str) -> str | None:
    """Why the input `size` (width, height) at params key `key` does not fit a model family
    whose input sides must be multiples of `stride`; None when it fits."""
    w, h = size
    if not (w % stride or h % stride):
        return None
    near = [max(stride, round(d / stride) * stride) for d in (w, h)]
    example = near[0] if near[0] == near[1] else near
    return (
        f"{key}: [{w}, {h}] (width, height) is not a multiple of {stride}, the stride of model "
        f"family {family!r}; use multiples of {stride}, e.g. {example}"
    )


class ProjectCfg(Section):
    mlflow_experiment: str = Field("shrinkflow", description="MLflow experiment (one per project)")
    registered_model: str = Field("shrinkflow-detector", description="MLflow registered model name")


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


class SplitCfg(Section):
    """How `ingest` splits a dataset that comes as one pool of images (a single COCO file, VOC
    without ImageSets/Main/{train,val,test}.txt, YOLO with `train` only). Near-duplicate images
    (perceptual hash within `label_qa.near_duplicate_bits`) always land in the same split."""

    val: float = Field(0.15, gt=0, lt=1, description="share of images for validation")
    test: float = Field(0.25, gt=0, lt=1, description="share of images for the test split")
    seed: int = Field(0, description="seed of the split (groups are shuffled with it)")

    @model_validator(mode="after")
    def _check(self) -> SplitCfg:
        if self.val + self.test >= 1:
            raise ValueError("val + test must leave images for train (sum < 1)")
        return self


class DatasetCfg(Section):
    """Where the data comes from; `ingest` turns any format into the internal COCO manifest."""

    format: Literal["builtin", "coco", "yolo", "voc"] = Field(
        "builtin",
        description="builtin: the digits composed by `ingest` (section `data`); coco: "
        "{train,val,test}.json or one file (`annotations`); yolo: Ultralytics data.yaml + "
        "images/ + labels/; voc: Annotations/*.xml, JPEGImages/, ImageSets/Main/*.txt",
    )
    path: SafePath = Field(
        "data",
        description="the dataset folder (a DVC dependency of `ingest`; never written to); "
        "ignored by the builtin source",
    )
    annotations: SafePath | None = Field(
        None,
        description="coco: one annotation file (relative to `path`) split by `split`, instead "
        "of {train,val,test}.json",
    )
    classes: list[str] | None = Field(
        None, description="voc: the class names in id order (default: the 20 Pascal VOC classes)"
    )
    split: SplitCfg | None = Field(
        None, description="split rule for data without its own train/val/test split"
    )

    def voc_classes(self) -> list[str]:
        return list(self.classes) if self.classes else list(VOC_CLASSES)


Rate = Annotated[float, Field(ge=0, le=1)]


class LabelNoiseCfg(Section):
    """Label noise the default data generator injects, as a share of boxes per kind (0 = off).

    Each box gets at most one kind; the ground truth goes to `<dataset>/noise.json`."""

    class_swap: Rate = Field(0.0, description="boxes relabelled with another class")
    shift: Rate = Field(0.0, description="boxes moved by 25-50% of their width and height")
    scale: Rate = Field(0.0, description="boxes shrunk to 50-70% or grown to 145-200% per side")
    drop: Rate = Field(0.0, description="boxes removed (the digit stays in the image)")
    duplicate: Rate = Field(0.0, description="boxes labelled twice (a 1-px jittered copy)")
    splits: list[Literal["train", "val", "test"]] = Field(
        ["train"], description="splits that get noise (keep test clean to measure mAP)"
    )

    @model_validator(mode="after")
    def _check(self) -> LabelNoiseCfg:
        if self.class_swap + self.shift + self.scale + self.drop + self.duplicate > 1:
            raise ValueError("the noise rates must sum to at most 1")
        return self


# the colours a coloured-shapes class may be named after (their RGB: tasks/shapes.py PALETTE)
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")


class ShapesCfg(Section):
    """Knobs of the coloured-shapes set (class = colour; shape random and not tied to class)."""

    seed: int = Field(0, description="seed of every random choice (same seed, same bytes)")
    train_images: PosInt = Field(300, description="training canvases")
    val_images: PosInt = Field(60, description="validation canvases")
    test_images: PosInt = Field(100, description="test canvases")
    width: int = Field(160, ge=32, le=2048, description="canvas width in pixels")
    height: int = Field(120, ge=32, le=2048, description="canvas height in pixels")
    objects_per_image: tuple[PosInt, PosInt] = Field((1, 4), description="min, max objects")
    object_size: tuple[PosInt, PosInt] = Field((10, 24), description="min, max object side, px")
    classes: list[str] = Field(
        ["red", "green", "blue"],
        min_length=2,
        description=f"class names, each a colour of: {', '.join(SHAPE_COLOURS)}",
    )
    colour_jitter: float = Field(
        0.08, ge=0, le=0.3, description="per-channel uniform jitter of an object's colour"
    )
    distractors: int = Field(2, ge=0, description="unlabelled grey shapes per canvas")
    clutter: int = Field(5, ge=0, description="grey strokes and rings per canvas")
    noise: LabelNoiseCfg = Field(
        default_factory=lambda: LabelNoiseCfg(),
        description="label noise injected on purpose (ground truth in noise.json); off by default",
    )

    @model_validator(mode="after")
    def _check(self) -> ShapesCfg:
        unknown = [c for c in self.classes if c not in SHAPE_COLOURS]
        if unknown:
            raise ValueError(
                f"unknown colour {unknown[0]!r}; choose from {', '.join(SHAPE_COLOURS)}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        lo, hi = self.object_size
        if lo > hi or hi > min(self.width, self.height) // 2:
            raise ValueError("object_size must be (min <= max <= min(width, height)/2)")
        if self.objects_per_image[0] > self.objects_per_image[1]:
            raise ValueError("objects_per_image must be (min <= max)")
        return self


class DataCfg(Section):
    """Knobs of the built-in data (`dataset.format: builtin`): the digits (composed from
    scikit-learn's handwritten digits; the knobs here) or the coloured shapes (`data.shapes`)."""

    kind: Literal["digits", "shapes"] = Field(
        "digits",
        description="digits: handwritten digits on square canvases (the knobs below); shapes: "
        "small coloured shapes whose class is their colour, on non-square canvases (its own "
        "knobs, counts and seed in data.shapes; the digit knobs are then unused)",
    )
    seed: int = Field(0, description="seed for splitting the digits and composing canvases")
    train_images: PosInt = Field(1200, description="composed training canvases")
    val_images: PosInt = Field(200, description="composed validation canvases")
    test_images: PosInt = Field(300, description="composed test canvases")
    canvas_size: int = Field(128, ge=32, le=1024, description="canvas side in pixels")
    digits_per_image: tuple[PosInt, PosInt] = Field((2, 5), description="min, max digits")
    digit_size: tuple[PosInt, PosInt] = Field((14, 36), description="min, max digit side, px")
    clutter: int = Field(6, ge=0, description="distractor strokes and fragments per canvas")
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.15, 0.25), description="fractions of the 1,797 source digits for train/val/test"
    )
    noise: LabelNoiseCfg = Field(
        default_factory=lambda: LabelNoiseCfg(),
        description="label noise injected on purpose (to measure label QA); off by default",
    )
    shapes: ShapesCfg = Field(
        default_factory=lambda: ShapesCfg(), description="the coloured shapes (kind: shapes)"
    )

    @model_validator(mode="after")
    def _check(self) -> DataCfg:
        lo, hi = self.digit_size
        if lo > hi or hi > self.canvas_size // 2:
            raise ValueError("digit_size must be (min <= max <= canvas_size/2)")
        if self.digits_per_image[0] > self.digits_per_image[1]:
            raise ValueError("digits_per_image must be (min <= max)")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) <= 0:
            raise ValueError("split_fractions must be three positive numbers summing to 1")
        return self


class LabelQaModelCfg(Section):
    """Model-based label checks (cleanlab's ObjectLab scores on out-of-sample predictions)."""

    enabled: bool = Field(True, description="run the model-based checks at all")
    champion: bool = Field(
        True,
        description="score val/test with the registry's `champion` when one exists (it never "
        "saw them); train is always scored by the cross-fit",
    )
    folds: int = Field(3, ge=2, le=10, description="K of the K-fold cross-fit on train")
    epochs: PosInt = Field(40, description="training epochs per fold")
    input_size: InputSize = Field(
        (128, 128), description="fold model input, px: one side or [width, height] (as train's)"
    )
    width: float = Field(
        0.5,
        gt=0,
        le=4,
        description="fold model channel multiplier (the built-in detector: it overrides "
        "model.centernet.width)",
    )
    lr: float = Field(8e-3, gt=0, description="fold model peak learning rate")
    min_map50: float = Field(
        0.2,
        ge=0,
        le=1,
        description="skip the model checks when the fold models' mean "
        "held-out mAP@0.5 is lower (too weak to judge labels)",
    )
    box_classifier: bool = Field(
        True,
        description="also classify each labelled box's pixels (cross-fitted on train) and "
        "flag the boxes whose class cleanlab's confident learning doubts (label_wrong_class)",
    )
    min_box_accuracy: float = Field(
        0.8,
        ge=0,
        le=1,
        description="skip the box classifier when its out-of-fold accuracy on the train "
        "boxes is lower (too weak to judge classes)",
    )
    apply_splits: list[Literal["train", "val", "test"]] = Field(
        ["train"],
        description="splits whose labels the model rules' policy may change; elsewhere their "
        "findings are only reported (val/test are the KPI reference: a model does not rewrite "
        "them unreviewed)",
    )
    swap_threshold: float = Field(
        0.4, ge=0, le=1, description="flag a box as wrong class below this swap score"
    )
    badloc_threshold: float = Field(
        0.6, ge=0, le=1, description="flag a box as badly placed below this location score"
    )
    overlooked_threshold: float = Field(
        0.5, ge=0, le=1, description="flag a missing box below this overlooked score"
    )
    high_probability: float = Field(
        0.7, gt=0, lt=1, description="calibrated confidence a prediction needs to count for swap"
    )
    missing_probability: float = Field(
        0.08, gt=0, lt=1, description="calibrated confidence a prediction needs to count as missing"
    )
    low_probability: float = Field(
        0.04, gt=0, lt=1, description="calibrated confidence a prediction needs for bad location"
    )


class LabelQaCfg(Section):
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="fail the run when the share of flagged images exceeds this"
    )
    min_box_px: float = Field(1.0, ge=0, description="boxes narrower/shorter than this are flagged")
    max_aspect: float = Field(8.0, gt=1, description="flag boxes longer than this times wide")
    duplicate_iou: float = Field(
        0.7, gt=0, le=1, description="same-class boxes overlapping this much are duplicates"
    )
    conflict_iou: float = Field(
        0.8, gt=0, le=1, description="boxes of different classes overlapping this much conflict"
    )
    near_duplicate_bits: int = Field(
        24,
        ge=0,
        le=256,
        description="images whose 256-bit perceptual hashes differ in at most "
        "this many bits are (near-)duplicates",
    )
    min_class_count: int = Field(
        10, ge=0, description="warn when a class has fewer boxes than this in a split"
    )
    policy: dict[str, Literal["drop", "fix", "keep"]] = Field(
        {},
        description="per rule: drop, fix (apply the suggested fix) or keep; "
        "rules not named use their default (see tasks/label_qa rules)",
    )
    model: LabelQaModelCfg = Field(default_factory=lambda: LabelQaModelCfg())
    min_fix_precision: float = Field(
        0.9,
        ge=0,
        le=1,
        description="a model-based rule changes labels only when its precision, measured each run "
        "on errors injected into a copy of the train split, is at least this; else it reports",
    )
    probe_rate: float = Field(
        0.1,
        gt=0,
        le=0.25,
        description="share of the train boxes corrupted per rule in that measurement (class swaps; "
        "shifted or scaled boxes; dropped boxes)",
    )
    max_own_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="the largest share of train boxes per error kind the precision measurement "
        "believes are the data's own errors: a model rule's changes that its injected copy "
        "cannot explain are credited as right only up to its recall times this many; the rest "
        "count as false alarms (0: every such change is a false alarm)",
    )
    decisions: str = Field(
        "label_qa/decisions.yaml",
        min_length=1,
        description="a reviewer's accept / reject per finding (YAML; the stage writes a template "
        "to review/decisions.yaml); decisions override the model and the policy; a DVC dep of "
        "the stage; an absent file means no decisions",
    )


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
    batch_size: PosInt = Field(32)
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW, one-cycle)")
    weight_decay: float = Field(1e-4, ge=0)
    input_size: InputSize = Field(
        (128, 128),
        description="model input, px: one side (a square, e.g. 128) or [width, height] (e.g. "
        "[320, 256]); each side a multiple of the model family's stride (centernet 16, yolo "
        "32). Note the order: [w, h] like PIL and the letterbox, not Ultralytics' imgsz [h, w]",
    )
    amp: bool = Field(True, description="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
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
        0.1, gt=0, lt=0.95, description="share of the base MACs removed per measured step"
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


class ExportCfg(Section):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset")
    max_detections: PosInt = Field(100, description="K of the in-graph top-K decode")
    score_floor: float = Field(0.01, ge=0, lt=1, description="detections below are not counted")
    simplifier: Literal["onnxsim", "onnxslim", "none"] = Field("onnxsim")
    parity_tolerance: float = Field(1e-3, gt=0, description="max |onnx - torch| allowed")
    parity_images: PosInt = Field(16, description="test images used for the parity check")
    parity_min_score: float = Field(
        0.1, ge=0, lt=1, description="detections below this score are not compared for parity"
    )


class QuantizeCfg(Section):
    """Post-training quantization of the exported ONNX with ONNX Runtime's tools (QDQ)."""

    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="precision of the deployable model/engines (if faster, see report)"
    )
    calibrator: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="activation-range calibrator (registered in tasks/quantize.py)"
    )
    percentile: float = Field(99.999, gt=90, le=100, description="for the percentile calibrator")
    calibration_images: PosInt = Field(64, description="train images used for calibration")
    seed: int = Field(0, description="which train images are drawn for calibration")
    activation_type: Literal["auto", "quint8", "qint8"] = Field(
        "auto",
        description="QDQ activation type: auto = what each build_engine target accepts (one "
        "model per distinct need: quint8 for ONNX Runtime CPU and OpenVINO, symmetric qint8 "
        "for TensorRT); quint8/qint8 = that type for every target (an error where one refuses it)",
    )
    accuracy_aware: bool = Field(
        True, description="measure per-layer sensitivity; keep the worst layers in float"
    )
    max_map_drop: float = Field(
        0.01, ge=0, le=1, description="largest val mAP@0.5 loss (0.01 = 1 point) INT8 may cost"
    )
    compare_calibrators: bool = Field(True, description="report every calibrator's val mAP")
    keep_faster: bool = Field(
        True,
        description="keep a layer type (or the whole model) in float where INT8 measures "
        "slower (batch-1 latency)",
    )
    keep_faster_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="keep_faster takes float only when it measures this much faster (0.05 = "
        "5%) in the median and in every round: timing noise keeps INT8",
    )
    keep_faster_rounds: int = Field(
        5, ge=1, le=50, description="keep_faster timing rounds (order shuffled, median each)"
    )
    qat_epochs: NonNegInt = Field(
        0, description="quantization-aware fine-tuning epochs before INT8 export (0 = PTQ only)"
    )
    qat_lr: float = Field(1e-4, gt=0, description="learning rate of the QAT fine-tune")


class BuildEngineCfg(Section):
    targets: list[Literal["onnxruntime", "openvino", "tensorrt", "litert"]] = Field(
        ["onnxruntime"], min_length=1, description="engine targets (one build/evaluate each)"
    )
    threads: PosInt = Field(2, description="intra-op threads of every CPU runtime")
    openvino_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="OpenVINO inference precision hint for float layers (CPU default "
        "is bf16 where the CPU has AMX/AVX512-BF16: f32 is set explicitly)",
    )
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field("LATENCY")
    openvino_fp16_weights: bool = Field(
        False, description="store float weights of the IR in FP16 (weight compression)"
    )
    tensorrt_precision: Literal["fp16", "fp32"] = Field(
        "fp16", description="float precision TensorRT may use; INT8 comes from the QDQ model"
    )
    tensorrt_batch: tuple[PosInt, PosInt, PosInt] = Field(
        (1, 8, 32), description="optimization profile min/opt/max batch"
    )
    tensorrt_workspace_mb: PosInt = Field(1024, description="builder workspace limit")


class EvaluateCfg(Section):
    score_threshold: float = Field(0.3, gt=0, lt=1, description="operating point for P/R")
    warmup: int = Field(10, ge=0, description="untimed calls before each timed block")
    latency_runs: PosInt = Field(60, description="timed batch-1 calls per runtime")
    throughput_batches: list[PosInt] = Field(
        [1, 8, 32], min_length=1, description="batch sizes for throughput; KPI at the largest"
    )
    throughput_runs: PosInt = Field(5)
    parity_iou: float = Field(0.5, gt=0, lt=1, description="IoU matching detections for parity")
    rounds: PosInt = Field(3, description="alternating benchmark rounds (order shuffled)")
    min_boxes: PosInt = Field(
        1, description="fewest boxes the cleaned test split may hold (fewer is an error)"
    )


class VariantsCfg(Section):
    peers: bool = Field(
        True,
        description="also the rows a user would get without Shrinkflow: NNCF's PTQ and "
        "accuracy-controlled INT8 on OpenVINO, and for family yolo Ultralytics' own OpenVINO "
        "INT8 export (each a few calibration and validation passes more)",
    )


class FlowCfg(Section):
    """How the Prefect flow (flows/compress.py) runs each stage; no stage reads this section."""

    retries: int = Field(1, ge=0, description="re-runs of a failed stage before the flow fails")
    retry_delay_s: float = Field(
        10.0, ge=0, description="delay before the first retry; doubled for each later one"
    )
    timeout_s: float = Field(7200.0, gt=0, description="wall-clock limit of one stage attempt")
    stage_timeout_s: dict[str, float] = Field(
        {}, description="per-stage limits overriding timeout_s (foreach items as `name@item`)"
    )
    approval_timeout_s: float = Field(
        86400.0, gt=0, description="how long a run waits for a reviewer before `promote`"
    )


# KPI keys of evaluate's metrics.json (DESIGN.md spelling) that a gate may name.
QUALITY_KPIS = ("map50", "map50_95", "precision", "recall")
Kpi = Literal[
    "map50",
    "map50_95",
    "precision",
    "recall",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "throughput_ips",
    "size_mb",
    "params",
    "macs",
]
QualityKpi = Literal["map50", "map50_95", "precision", "recall"]


class _Gate(Section):
    name: str | None = Field(
        None, description="name in decision.json and the registry (default: derived from kind)"
    )


class AbsoluteGate(_Gate):
    """The candidate's KPI against a fixed bound, in the KPI's own unit (`map50 >= 0.9`)."""

    kind: Literal["absolute"]
    kpi: Kpi = Field(description="KPI key of evaluate's metrics.json")
    op: Literal[">=", "<=", ">", "<"] = Field(description="comparison: KPI <op> value")
    value: float = Field(description="bound, in the KPI's unit (mAP 0..1, ms, MB, ...)")


class RelativeGate(_Gate):
    """The candidate's quality KPI minus the FP32 baseline's (evaluate's `delta_<kpi>`)."""

    kind: Literal["relative"]
    kpi: QualityKpi = Field("map50", description="quality KPI compared with FP32")
    min_delta_points: float = Field(
        description="smallest allowed candidate - FP32 difference, in points (1 point = 0.01)"
    )


class PerClassGate(_Gate):
    """No class's AP@0.5 may fall more than `max_drop_points` below the FP32 baseline's."""

    kind: Literal["per_class"]
    max_drop_points: float = Field(
        ge=0, description="largest allowed per-class AP@0.5 loss, points"
    )


class NonRegressionGate(_Gate):
    """Candidate vs the current champion on the same test split: paired bootstrap over images
    of the mAP@0.5 difference; refused when the whole confidence interval lies below
    -tolerance (worse beyond noise). Passes with no champion."""

    kind: Literal["non_regression"]
    tolerance_points: float = Field(
        0.5, ge=0, description="refuse when the CI's upper bound < -tolerance (points)"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided CI level")
    resamples: int = Field(1000, ge=50, le=100_000, description="bootstrap resamples")
    seed: int = Field(0, description="bootstrap seed")


Gate = Annotated[
    AbsoluteGate | RelativeGate | PerClassGate | NonRegressionGate, Field(discriminator="kind")
]


def gate_name(gate: AbsoluteGate | RelativeGate | PerClassGate | NonRegressionGate) -> str:
    """`name` when given, else `<kind>[.<kpi>]` (e.g. `absolute.map50`, `per_class`)."""
    if gate.name:
        return gate.name
    kpi = getattr(gate, "kpi", None)
    return f"{gate.kind}.{kpi}" if kpi else gate.kind


class PromoteCfg(Section):
    """Gates and registry settings of the `promote` stage (MLflow model registry)."""

    target: Literal["onnxruntime", "openvino", "tensorrt", "litert"] = Field(
        "onnxruntime",
        description="engine target whose evaluate KPIs gate the candidate and which the "
        "registered pyfunc serves (must be one of build_engine.targets)",
    )
    gates: list[Gate] = Field(
        default_factory=list, description="every gate must pass for the candidate to be champion"
    )
    allow_no_gates: bool = Field(
        False,
        description="true: an empty `gates` list is meant (every candidate becomes champion); "
        "without it `promote` refuses to run with no gates",
    )
    require_approval: bool = Field(
        False,
        description="the Prefect flow pauses before `promote` for a human decision; the stage "
        "itself ignores this",
    )
    lock_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an alias move left unfinished this long is taken as abandoned (crashed)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PromoteCfg:
        names = [gate_name(g) for g in self.gates]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"gate names must be unique (give each a `name`): {dup}")
        return self


class Params(Section):
    project: ProjectCfg = ProjectCfg()
    model: ModelCfg = ModelCfg()
    dataset: DatasetCfg = DatasetCfg()
    data: DataCfg = DataCfg()
    label_qa: LabelQaCfg = LabelQaCfg()
    train: TrainCfg = TrainCfg()
    prune: PruneCfg = PruneCfg()
    distill: DistillCfg = DistillCfg()
    export: ExportCfg = ExportCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    build_engine: BuildEngineCfg = BuildEngineCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    variants: VariantsCfg = VariantsCfg()
    flow: FlowCfg = FlowCfg()
    promote: PromoteCfg = PromoteCfg()

    @model_validator(mode="after")
    def _promote_target_is_built(self) -> Params:
        if self.promote.target not in self.build_engine.targets:
            raise ValueError(
                f"promote.target: {self.promote.target!r} is not built; choose one of "
                f"build_engine.targets ({', '.join(self.build_engine.targets)})"
            )
        return self

    @model_validator(mode="after")
    def _promote_has_gates(self) -> Params:
        if "promote" in self.model_fields_set and not (
            self.promote.gates or self.promote.allow_no_gates
        ):
            raise ValueError(
                "promote.gates: empty: every candidate would become champion; list gates, or "
                "set promote.allow_no_gates: true to promote without any"
            )
        return self

    @model_validator(mode="after")
    def _input_fits_the_family(self) -> Params:
        stride, family = self.model.input_stride, self.model.family
        for key, size in (
            ("train.input_size", self.train.input_size),
            ("label_qa.model.input_size", self.label_qa.model.input_size),
        ):
            if problem := stride_problem(key, size, stride, family):
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _int8_fits_targets(self) -> Params:
        from tasks.engines.int8 import ACCEPTS, conflicts

        q = self.quantize
        if q.precision == "int8" and (
            bad := conflicts(q.activation_type, self.build_engine.targets)
        ):
            raise ValueError(
                f"quantize.activation_type: {q.activation_type} cannot serve "
                f"build_engine.targets {', '.join(bad)} (accepts "
                f"{'; '.join(f'{t}: ' + '/'.join(ACCEPTS[t]) for t in bad)}); use auto"
            )
        return self


_KEYED = re.compile(r"^Value error, ([a-z_]+(?:\.[a-z_0-9]+)+): (.*)$", re.S)


def _format(file: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if not e["loc"] and (m := _KEYED.match(msg)):  # a cross-section check names its key
            key, msg = m.group(1), m.group(2)
        lines.append(f"{file}: {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", require: tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml.

    Args:
        path: the params file.
        require: sections that must be written in the file (a stage refuses to run on built-in
            defaults for the sections it reads: an empty or wrong file is not a valid config).

    Raises:
        ConfigError: the file is missing, not YAML, lacks a required section, or any key is
            unknown, mistyped or out of range.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping of sections")
    missing = [s for s in require if not isinstance(raw.get(s), dict)]
    if missing:
        raise ConfigError(
            f"{path}: {', '.join(missing)}: section missing (this stage reads it and does not "
            "run on built-in defaults)"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(path.name, e)) from e
