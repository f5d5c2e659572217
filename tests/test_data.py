import json

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from tasks.datasets import digits as data
from tests.conftest import small_data_cfg


def test_source_digits_split_is_disjoint_and_complete():
    parts = data.split_sources(1797, (0.6, 0.15, 0.25), seed=3)
    sets = [set(parts[s].tolist()) for s in data.SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(s) for s in sets) == 1797


def test_composed_splits_share_no_source_digit(tmp_path):
    data.run(small_data_cfg(), out_dir=tmp_path / "d")
    used = {}
    for split in data.SPLITS:
        coco = json.loads((tmp_path / "d" / f"{split}.json").read_text())
        used[split] = {a["source_index"] for a in coco["annotations"]}
        assert coco["annotations"], split
    assert not used["train"] & used["val"]
    assert not used["train"] & used["test"]
    assert not used["val"] & used["test"]


def test_boxes_match_the_pasted_digits(tmp_path):
    """Each box, cropped from the canvas, looks like its source digit (and its label is right)."""
    cfg = small_data_cfg(clutter=0, digits_per_image=(1, 2), digit_size=(20, 30))
    data.run(cfg, out_dir=tmp_path / "d")
    digits = load_digits()
    coco = json.loads((tmp_path / "d" / "train.json").read_text())
    scores = []
    for a in coco["annotations"]:
        im = next(i for i in coco["images"] if i["id"] == a["image_id"])
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        crop = np.asarray(Image.open(tmp_path / "d" / im["file_name"]).convert("L"), np.float32)
        crop = crop[y : y + h, x : x + w]
        glyph = digits.images[a["source_index"]]
        ys, xs = np.nonzero(glyph / 16 > 0.25)
        glyph = glyph[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        ref = np.asarray(Image.fromarray(glyph.astype(np.float32)).resize((w, h), Image.BILINEAR))
        corr = abs(np.corrcoef(crop.ravel(), ref.ravel())[0, 1])  # ink may be darker or lighter
        scores.append(corr)
        assert a["category_id"] == digits.target[a["source_index"]] + 1
    assert np.median(scores) > 0.8, scores


def test_same_seed_same_data(tmp_path):
    data.run(small_data_cfg(), out_dir=tmp_path / "a")
    data.run(small_data_cfg(), out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "train.json").read_text() == (
        tmp_path / "b" / "train.json"
    ).read_text()
