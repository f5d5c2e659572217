"""The coloured-shapes set: COCO layout like the digits, class carried by colour only, seeded,
and injected noise whose ground truth matches the files."""

import json

import numpy as np
import pytest

from tasks.datasets.coco import load_coco, read_rgb
from tasks.datasets.digits import NOISE_FILE
from tasks.datasets.shapes import PALETTE, ShapesCfg, generate

SMALL = {"train_images": 30, "val_images": 5, "test_images": 5}


def test_layout_names_sizes_and_boxes(tmp_path):
    cfg = ShapesCfg(**SMALL)
    metrics = generate(cfg, tmp_path / "s")
    for split in ("train", "val", "test"):
        coco = load_coco(tmp_path / "s" / f"{split}.json")
        assert [c.name for c in coco.categories] == ["red", "green", "blue"]
        assert len(coco.images) == metrics[split]["images"] and coco.annotations
        for im in coco.images:
            assert read_rgb(tmp_path / "s" / im.file_name).shape == (120, 160, 3)
        for a in coco.annotations:
            x, y, w, h = a.bbox
            assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 120 and w >= 4 and h >= 4
    assert json.loads((tmp_path / "s" / NOISE_FILE).read_text())["injected"] == []


def test_class_is_the_colour_and_shape_is_not_tied_to_class(tmp_path):
    generate(ShapesCfg(train_images=80, val_images=1, test_images=1), tmp_path / "s")
    coco = json.loads((tmp_path / "s/train.json").read_text())
    pixels = {}
    shapes_per_class: dict[int, set] = {}
    for a in coco["annotations"]:
        im = pixels.setdefault(
            a["image_id"], read_rgb(tmp_path / f"s/images/train/{a['image_id']:05d}.png")
        )
        x, y, w, h = (int(v) for v in a["bbox"])
        centre = im[y + h // 2 - 1 : y + h // 2 + 2, x + w // 2 - 1 : x + w // 2 + 2].reshape(-1, 3)
        colour = centre.mean(0) / 255
        names = list(PALETTE)[:3]
        nearest = min(
            range(3),
            key=lambda k: np.abs(
                colour / colour.max() - np.array(PALETTE[names[k]]) / max(PALETTE[names[k]])
            ).sum(),
        )
        assert nearest + 1 == a["category_id"], (a, colour)
        shapes_per_class.setdefault(a["category_id"], set()).add(a["shape"])
    assert all(len(s) == 4 for s in shapes_per_class.values())  # every shape in every class


def test_same_seed_same_bytes_and_noise_truth_matches(tmp_path):
    noise = {"class_swap": 0.1, "shift": 0.1, "drop": 0.1}
    cfg = ShapesCfg(**SMALL, noise=noise)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    for name in ("train.json", "noise.json", "images/train/00003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    truth = json.loads((tmp_path / "a" / NOISE_FILE).read_text())["injected"]
    anns = {a["id"]: a for a in json.loads((tmp_path / "a/train.json").read_text())["annotations"]}
    assert {r["kind"] for r in truth} == set(noise)
    for r in truth:
        if r["kind"] == "drop":
            assert r["annotation_id"] not in anns
            continue
        a = anns[r["annotation_id"]]
        assert r["noisy"] == {"category_id": a["category_id"], "bbox": a["bbox"]}
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 120


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        ShapesCfg(classes=["red", "mauve"])
    with pytest.raises(ValueError, match="extra"):
        ShapesCfg(colours=["red"])
