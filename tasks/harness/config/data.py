"""Sections `project`, `dataset` (what `ingest` reads) and `data` (the built-in digits)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.harness.sections import PosInt, Rate, SafePath, Section


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


# the colours a coloured-shapes class may be named after (their RGB: tasks/datasets/shapes.py)
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
