"""Letterbox: fit an image into the model input keeping its aspect ratio, pad the rest, and map
boxes both ways exactly.

Every place an image meets the model goes through `letterbox` (training, evaluation, calibration,
label QA's cross-fit, the served pyfunc, every engine's input), and every prediction goes back to
the image's pixels through `Letterbox.to_image`, the exact inverse of `Letterbox.to_input`. The
image is scaled by r = min(W / w, H / h) (rounded to whole pixels per axis) and centred; an image
already at the input size is passed through untouched (the default digits: a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PAD_VALUE = 114  # grey, as in Ultralytics and MMDetection's YOLO pipelines


@dataclass(frozen=True)
class Letterbox:
    """input = image * (sx, sy) + (pad_x, pad_y), per axis (sx and sy differ only by rounding);
    `width` x `height` is the image (0: unknown, boxes mapped back are not clipped)."""

    sx: float
    sy: float
    pad_x: float
    pad_y: float
    width: int = 0
    height: int = 0

    def to_input(self, xyxy: np.ndarray) -> np.ndarray:
        """Boxes (..., 4) xyxy in image pixels -> input pixels."""
        s = np.array([self.sx, self.sy, self.sx, self.sy], np.float64)
        p = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float64)
        return (np.asarray(xyxy, np.float64) * s + p).astype(np.float32)

    def to_image(self, xyxy: np.ndarray, clip: bool = True) -> np.ndarray:
        """Boxes (..., 4) xyxy in input pixels -> image pixels (the exact inverse of to_input),
        clipped to the image when its size is known and `clip` (a prediction reaching into the
        padding ends at the image border, as Ultralytics clips)."""
        s = np.array([self.sx, self.sy, self.sx, self.sy], np.float64)
        p = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], np.float64)
        back = (np.asarray(xyxy, np.float64) - p) / s
        if clip and self.width and self.height:
            wh = np.array([self.width, self.height, self.width, self.height], np.float64)
            back = np.clip(back, 0.0, wh)
        return back


def input_wh(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(width, height) of a model input given as a side or as [w, h]."""
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def build_size(size: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    """`size` as `ModelAdapter.build` takes it: one side for a square (what adapters written
    before rectangles expect), (width, height) for a rectangle."""
    w, h = input_wh(size)
    return w if w == h else (w, h)


def fit(width: int, height: int, size: int | tuple[int, int] | list[int]) -> Letterbox:
    """The transform of a `width` x `height` image into the input `size`."""
    tw, th = input_wh(size)
    r = min(tw / width, th / height)
    nw, nh = min(tw, max(1, round(width * r))), min(th, max(1, round(height * r)))
    return Letterbox(nw / width, nh / height, (tw - nw) // 2, (th - nh) // 2, width, height)


def letterbox(
    rgb: np.ndarray, size: int | tuple[int, int] | list[int]
) -> tuple[np.ndarray, Letterbox]:
    """uint8 (h, w, 3) -> uint8 (H, W, 3) model input and its transform (bilinear resize)."""
    tw, th = input_wh(size)
    h, w = rgb.shape[:2]
    t = fit(w, h, size)
    if (w, h) == (tw, th):
        return rgb, t
    nw, nh = round(w * t.sx), round(h * t.sy)
    out = np.full((th, tw, 3), PAD_VALUE, np.uint8)
    scaled = (
        rgb
        if (nw, nh) == (w, h)
        else np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    )
    out[int(t.pad_y) : int(t.pad_y) + nh, int(t.pad_x) : int(t.pad_x) + nw] = scaled
    return out, t
