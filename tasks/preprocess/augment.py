"""Box-aware training augmentation: the typed steps of `train.augment`, run by albumentations.

Boxes are xyxy in input pixels; after the steps they are clipped to the image, and a box with
less than 60% of its area left (or under 1 px wide or high) is dropped with its label, the same
rule for every step. Mosaic draws its three other tiles from the training set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np

from tasks.harness.config import (
    AugmentStep,
    ChannelShuffleAug,
    HFlipAug,
    HsvAug,
    MosaicAug,
    ScaleJitterAug,
    ShiftAug,
    VFlipAug,
)

MIN_VISIBLE = 0.6  # share of a box's area that must stay inside the image


def _transform(step: AugmentStep, w: int, h: int) -> A.BasicTransform:
    if isinstance(step, ShiftAug):
        px = int(step.fraction * min(w, h))
        return A.Affine(translate_px=(-px, px), border_mode=cv2.BORDER_CONSTANT, fill=0, p=step.p)
    if isinstance(step, HFlipAug):
        return A.HorizontalFlip(p=step.p)
    if isinstance(step, VFlipAug):
        return A.VerticalFlip(p=step.p)
    if isinstance(step, ScaleJitterAug):
        return A.Affine(
            scale=step.range, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=step.p
        )
    if isinstance(step, HsvAug):
        return A.ColorJitter(
            brightness=step.value, contrast=0, saturation=step.saturation, hue=step.hue, p=step.p
        )
    if isinstance(step, ChannelShuffleAug):
        return A.ChannelShuffle(p=step.p)
    if isinstance(step, MosaicAug):
        return A.Mosaic(target_size=(h, w), cell_shape=(h, w), p=step.p)
    raise TypeError(f"unknown augmentation step {step!r}")


class Augmenter:
    """The steps as one albumentations pipeline, seeded; call it on a batch."""

    def __init__(self, steps: Sequence[AugmentStep], width: int, height: int, seed: int) -> None:
        ordered = sorted(steps, key=lambda s: not isinstance(s, MosaicAug))  # mixing goes first
        self.mosaic = any(isinstance(s, MosaicAug) for s in steps)
        with warnings.catch_warnings():  # photometric-only lists: "no transform to process" boxes
            warnings.simplefilter("ignore", UserWarning)
            self.compose = self._compose([_transform(s, width, height) for s in ordered], seed)

    @staticmethod
    def _compose(transforms: list, seed: int) -> A.Compose:
        return A.Compose(
            transforms,
            bbox_params=A.BboxParams(
                format="pascal_voc",
                label_fields=["labels"],
                min_visibility=MIN_VISIBLE,
                min_width=1,
                min_height=1,
                clip=True,
            ),
            seed=seed,
        )

    def __call__(
        self,
        images: np.ndarray,
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
        pool,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Augment uint8 (B, H, W, 3) with their boxes (M, 4) xyxy and labels (M,); `pool` (a
        DetectionSet with images / boxes / labels) feeds the mosaic's other tiles."""
        out_images, out_boxes, out_labels = [], [], []
        for img, bx, lb in zip(images, boxes, labels, strict=True):
            extra = {}
            if self.mosaic:
                picks = rng.integers(0, len(pool.images), 3)
                extra["mosaic_metadata"] = [
                    {"image": pool.images[k], "bboxes": pool.boxes[k], "labels": pool.labels[k]}
                    for k in picks
                ]
            r = self.compose(image=img, bboxes=bx, labels=lb, **extra)
            out_images.append(r["image"])
            out_boxes.append(np.asarray(r["bboxes"], np.float32).reshape(-1, 4))
            out_labels.append(np.asarray(r["labels"], np.int64).reshape(-1))
        return np.stack(out_images), out_boxes, out_labels


def augmenter(steps: Sequence[AugmentStep], width: int, height: int, seed: int):
    """An Augmenter, or None when `steps` is empty."""
    return Augmenter(steps, width, height, seed) if steps else None
