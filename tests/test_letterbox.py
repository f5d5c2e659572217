"""Letterbox round trips, and COCO semantics: crowds are ignored, empty images are negatives."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.datasets.coco import DetectionSet
from tasks.metrics.detection import coco_metrics, predict
from tasks.preprocess.letterbox import PAD_VALUE, fit, letterbox


@pytest.mark.parametrize(
    ("w", "h", "size"),
    [(640, 480, 320), (300, 170, 128), (90, 200, 64), (128, 128, 128), (64, 40, [96, 64])],
)
def test_box_maps_to_the_input_and_back_exactly(w, h, size):
    t = fit(w, h, size)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (20, 2)) * (w, h)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (20, 2))], axis=1)
    assert np.allclose(t.to_image(t.to_input(boxes), clip=False), boxes, atol=1e-3)
    assert abs(t.sx - t.sy) <= 1 / min(w, h)  # aspect ratio kept (up to whole-pixel rounding)


def test_a_prediction_reaching_into_the_padding_ends_at_the_image_border():
    t = fit(640, 480, 320)  # 320 x 240 inside a 320 x 320 input: 40 px of padding above and below
    assert (t.pad_x, t.pad_y) == (0, 40)
    pred = np.array([[-5.0, 20.0, 100.0, 150.0], [200.0, 250.0, 330.0, 300.0]])
    back = t.to_image(pred)
    assert np.allclose(back, [[0, 0, 200, 220], [400, 420, 640, 480]])
    assert np.allclose(t.to_image(t.to_input(back)), back)  # inside the image: exact


def test_square_image_at_the_input_size_is_passed_through():
    rgb = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    out, t = letterbox(rgb, 128)
    assert out is rgb and (t.sx, t.sy, t.pad_x, t.pad_y) == (1, 1, 0, 0)


def _manifest(tmp_path, size, boxes, crowd=()):
    """One non-square image with white rectangles at `boxes` (xywh) on black."""
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    for x, y, bw, bh in boxes:
        rgb[y : y + bh, x : x + bw] = 255
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "empty.png")
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": list(b), "area": b[2] * b[3],
         "iscrowd": int(k in crowd)}
        for k, b in enumerate(boxes)
    ]  # fmt: skip
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": w, "height": h},
            {"id": 2, "file_name": "empty.png", "width": w, "height": h},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"}],
    }
    return {"root": str(tmp_path), "splits": {"test": coco}}


@pytest.mark.parametrize(("size", "input_size"), [((256, 160), 128), ((300, 170), 128)])
def test_a_box_drawn_on_a_non_square_image_comes_back_at_the_same_pixels(
    tmp_path, size, input_size
):
    box = (40, 30, 100, 60)  # x, y, w, h in image pixels
    ds = DetectionSet(_manifest(tmp_path, size, [box]), "test", input_size)
    assert ds.images.shape == (2, input_size, input_size, 3)
    lb = ds.letterboxes[0]
    assert lb.pad_y > 0 and lb.pad_x == 0  # wide image: bars above and below
    assert (ds.images[0, : int(lb.pad_y)] == PAD_VALUE).all()
    # where the rectangle's pixels are in the letterboxed input ...
    ys, xs = np.nonzero(ds.images[0, ..., 0] > 127)
    seen = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    assert np.allclose(seen, ds.boxes[0], atol=1.0)  # ... is where the label went

    # ... and a detection there comes back at the drawn pixels
    def runner(x):  # detects exactly the pixels it sees
        return np.array([1, 0]), np.stack([seen, seen * 0]), np.ones((2, 1)), np.zeros((2, 1))

    (row,) = predict(runner, ds)
    tol = 1 / lb.sx  # one input pixel, in image pixels
    assert np.allclose(row["bbox"], box, atol=tol), (row["bbox"], box, tol)
    exact = predict(
        lambda x: (
            np.array([1, 0]),
            np.stack([ds.boxes[0]] * 2),
            np.ones((2, 1)),
            np.zeros((2, 1)),
        ),
        ds,
    )
    assert np.allclose(exact[0]["bbox"], box, atol=1e-3)


def test_crowds_are_not_training_targets_and_are_ignored_in_evaluation(tmp_path):
    boxes = [(10, 10, 40, 40), (120, 60, 60, 50)]
    manifest = _manifest(tmp_path, (256, 160), boxes, crowd=(1,))
    ds = DetectionSet(manifest, "test", 128)
    assert len(ds) == 2  # the empty image is kept as a negative
    assert ds.boxes[0].shape == (1, 4) and ds.boxes[1].shape == (0, 4)
    gt = manifest["splits"]["test"]

    def det(b, score):
        return {"image_id": 1, "category_id": 1, "bbox": list(b), "score": score}

    only_real = coco_metrics(gt, [det(boxes[0], 0.9)], 0.3)
    assert only_real["recall"] == 1.0 and only_real["map50"] == pytest.approx(1.0)
    on_crowd = coco_metrics(gt, [det(boxes[0], 0.9), det(boxes[1], 0.8)], 0.3)
    assert on_crowd["precision"] == 1.0  # a detection on a crowd is no false positive
    for a in gt["annotations"]:
        a["iscrowd"] = 0
    assert coco_metrics(gt, [det(boxes[0], 0.9)], 0.3)["recall"] == 0.5  # control


def test_inputs_are_decoded_once_into_a_memory_map(tmp_path, monkeypatch):
    from tasks.preprocess import input_cache

    monkeypatch.setenv("SHRINKFLOW_INPUT_CACHE", str(tmp_path / "cache"))
    manifest = _manifest(tmp_path, (256, 160), [(40, 30, 100, 60)])
    first = DetectionSet(manifest, "test", 128)
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_decode(path):
        raise AssertionError(f"decoded {path} again")

    inputs, transforms = input_cache.decoded_inputs(
        tmp_path, manifest["splits"]["test"]["images"], 128, no_decode
    )
    assert np.array_equal(inputs, first.images) and transforms == first.letterboxes
    Image.fromarray(np.full((160, 256, 3), 255, np.uint8)).save(tmp_path / "empty.png")
    changed = DetectionSet(manifest, "test", 128)  # a changed file is decoded afresh
    assert (changed.images[1, 64] == 255).all() and len(
        list((tmp_path / "cache").glob("*.npy"))
    ) == 2
