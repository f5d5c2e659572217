"""`train.augment`: typed steps, box-aware (albumentations), colour kept unless configured."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from tasks.harness.config import TrainCfg
from tasks.preprocess.augment import Augmenter


def _batch(n=4, w=96, h=64):
    rng = np.random.default_rng(0)
    images = np.zeros((n, h, w, 3), np.uint8)
    images[..., 0] = 200  # red: the colour of the class
    boxes = [np.array([[10, 10, 30, 40], [50, 5, 90, 60]], np.float32) for _ in range(n)]
    labels = [np.array([0, 1]) for _ in range(n)]
    return images, boxes, labels, rng


def steps(*items):
    return TrainCfg(augment=list(items)).augment


def test_default_is_a_shift_without_colour_changes():
    (step,) = TrainCfg().augment
    assert step.kind == "shift" and step.p == 1.0
    assert TrainCfg(augment=True).augment == TrainCfg().augment
    assert TrainCfg(augment=False).augment == []
    with pytest.raises(ValidationError, match="kind"):
        TrainCfg(augment=[{"kind": "rotate90", "p": 0.5}])
    with pytest.raises(ValidationError):
        TrainCfg(augment=[{"kind": "hsv", "p": 1.5}])


def test_hflip_moves_the_boxes_with_the_pixels():
    images, boxes, labels, rng = _batch()
    aug = Augmenter(steps({"kind": "hflip", "p": 1.0}), 96, 64, seed=0)
    out, ob, ol = aug(images, boxes, labels, None, rng)
    assert np.allclose(ob[0], [[66, 10, 86, 40], [6, 5, 46, 60]])
    assert (ol[0] == [0, 1]).all() and out.shape == images.shape


@pytest.mark.parametrize(
    "step",
    [
        {"kind": "shift", "p": 1.0, "fraction": 0.4},
        {"kind": "scale_jitter", "p": 1.0, "range": [0.5, 1.5]},
        {"kind": "hsv", "p": 1.0},
        {"kind": "vflip", "p": 1.0},
        {"kind": "mosaic", "p": 1.0},
        {"kind": "channel_shuffle", "p": 1.0},
    ],
)
def test_every_step_keeps_boxes_inside_and_labels_aligned(step):
    images, boxes, labels, rng = _batch()

    pool = SimpleNamespace(images=images, boxes=boxes, labels=labels)  # as a DetectionSet
    aug = Augmenter(steps(step), 96, 64, seed=1)
    out, ob, ol = aug(images, boxes, labels, pool, rng)
    assert out.shape == images.shape and out.dtype == np.uint8
    for b, lb in zip(ob, ol, strict=True):
        assert len(b) == len(lb)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 3] <= 64).all()
        assert ((b[:, 2] - b[:, 0]) >= 1).all()
    again = Augmenter(steps(step), 96, 64, seed=1)(images, boxes, labels, pool, _batch()[3])
    assert all(np.array_equal(a, b) for a, b in zip(ob, again[1], strict=True))  # seeded


def test_photometric_jitter_keeps_colour_meaning_unless_hue_is_configured():
    images, boxes, labels, rng = _batch(n=16)
    out, _, _ = Augmenter(steps({"kind": "hsv", "p": 1.0}), 96, 64, 0)(
        images, boxes, labels, None, rng
    )
    assert (out[..., 0] >= out[..., 1]).all() and (out[..., 0] >= out[..., 2]).all()  # still red
    hue = steps({"kind": "hsv", "p": 1.0, "hue": 0.5})
    out, _, _ = Augmenter(hue, 96, 64, 0)(images, boxes, labels, None, rng)
    assert (out[:, 0, 0, 0] < out[:, 0, 0, 1:].max(-1)).any()  # some image is no longer red


def test_a_shift_drops_a_box_pushed_mostly_outside():
    images, _, _, rng = _batch(n=32)
    edge = [np.array([[0, 0, 10, 10]], np.float32)] * 32
    lbl = [np.array([0])] * 32
    aug = Augmenter(steps({"kind": "shift", "p": 1.0, "fraction": 0.5}), 96, 64, seed=0)
    _, ob, ol = aug(images, edge, lbl, None, rng)
    kept = [len(b) for b in ob]
    assert 0 in kept and 1 in kept  # some shifts hide it, some keep it
    for b in ob:
        if len(b):
            assert (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) >= 0.6 * 100 - 1e-3


def test_augmenting_a_batch_is_cheap():
    images, boxes, labels, rng = _batch(n=32, w=128, h=128)
    aug = Augmenter(TrainCfg().augment, 128, 128, seed=0)
    t0 = time.perf_counter()
    for _ in range(5):
        aug(images, boxes, labels, None, rng)
    assert (time.perf_counter() - t0) / 5 < 0.5  # s per batch of 32 (shared machine: loose)
