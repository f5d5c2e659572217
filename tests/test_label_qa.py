"""Structural label QA on small hand-made COCO sets with known defects."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import label_qa
from tasks.config import LabelQaCfg
from tasks.errors import DataError
from tasks.project import ROOT

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def make_dataset(root, defects=()):
    """Three splits of 4 images 32x32, each with one good box; `defects` alter train."""
    root.mkdir(parents=True, exist_ok=True)
    for split in label_qa.SPLITS:
        (root / split).mkdir(exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": CATS}
        for i in range(1, 5):
            name = f"{split}/{i}.png"
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / name)
            coco["images"].append({"id": i, "file_name": name, "width": 32, "height": 32})
            coco["annotations"].append(
                {"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 10, 12]}
            )
        if split == "train":
            for defect in defects:
                defect(root, coco)
        (root / f"{split}.json").write_text(json.dumps(coco))
    return root


def box_outside(root, coco):
    coco["annotations"][0]["bbox"] = [25, 25, 10, 10]


def missing_image(root, coco):
    (root / coco["images"][1]["file_name"]).unlink()


def truncated_png(root, coco):
    path = root / coco["images"][2]["file_name"]
    path.write_bytes(path.read_bytes()[:60])


def wrong_size(root, coco):
    coco["images"][3]["width"] = 64


def unknown_category(root, coco):
    coco["annotations"][1]["category_id"] = 9


def empty_box(root, coco):
    coco["annotations"][2]["bbox"] = [3, 3, 0, 5]


def tiny_box(root, coco):
    coco["annotations"].append({"id": 99, "image_id": 4, "category_id": 2, "bbox": [1, 1, 0.5, 4]})


def orphan_annotation(root, coco):
    coco["annotations"].append({"id": 77, "image_id": 1234, "category_id": 1, "bbox": [1, 1, 4, 4]})


def test_clean_dataset_has_no_findings(tmp_path):
    findings, manifest, metrics = label_qa.run(LabelQaCfg(), dataset=make_dataset(tmp_path / "d"))
    assert findings == []
    assert metrics["error_rate"] == 0
    assert len(manifest["splits"]["train"]["annotations"]) == 4


@pytest.mark.parametrize(
    ("defect", "rule", "image_id", "ann_id"),
    [
        (box_outside, "box_outside_image", 1, 1),
        (missing_image, "image_unreadable", 2, None),
        (truncated_png, "image_unreadable", 3, None),
        (wrong_size, "image_size_mismatch", 4, None),
        (unknown_category, "unknown_category", 2, 2),
        (empty_box, "box_empty", 3, 3),
        (tiny_box, "box_too_small", 4, 99),
        (orphan_annotation, "unknown_image", 1234, 77),
    ],
)
def test_each_rule_finds_its_defect(tmp_path, defect, rule, image_id, ann_id):
    findings, manifest, _ = label_qa.run(
        LabelQaCfg(), dataset=make_dataset(tmp_path / "d", [defect])
    )
    assert [(f.rule, f.split, f.image_id, f.annotation_id) for f in findings] == [
        (rule, "train", image_id, ann_id)
    ]
    kept = manifest["splits"]["train"]
    if label_qa.RULES[rule].severity == "error" and ann_id is None:
        assert image_id not in {im["id"] for im in kept["images"]}
        assert image_id not in {a["image_id"] for a in kept["annotations"]}
    elif label_qa.RULES[rule].severity == "error":
        assert ann_id not in {a["id"] for a in kept["annotations"]}
    else:
        assert ann_id in {a["id"] for a in kept["annotations"]}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.write_text("{not json"), "train.json: not valid JSON"),
        (lambda p: p.write_bytes(b'{"images": "\xff\xfe"}'), "train.json: not UTF-8"),
        (
            lambda p: p.write_text(json.dumps({"images": [], "categories": CATS})),
            "train.json: annotations: Field required",
        ),
        (
            lambda p: p.write_text(
                json.dumps(
                    {
                        "images": [{"id": 1, "file_name": "x.png", "width": "wide", "height": 3}],
                        "annotations": [],
                        "categories": CATS,
                    }
                )
            ),
            "train.json: images[0].width: Input should be a valid integer",
        ),
        (
            lambda p: p.write_text(
                json.dumps(
                    {
                        "images": [
                            {"id": 1, "file_name": "../../etc/passwd", "width": 3, "height": 3}
                        ],
                        "annotations": [],
                        "categories": CATS,
                    }
                )
            ),
            "train.json: images[0].file_name: path '../../etc/passwd' escapes the dataset root",
        ),
    ],
)
def test_malformed_coco_is_a_clear_error(tmp_path, corrupt, message):
    root = make_dataset(tmp_path / "d")
    corrupt(root / "train.json")
    with pytest.raises(DataError) as err:
        label_qa.run(LabelQaCfg(), dataset=root)
    assert message in str(err.value)


def run_stage(tmp_path, dataset, max_error_rate):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["label_qa"]["max_error_rate"] = max_error_rate
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.label_qa",
            "--params",
            "params.yaml",
            "--dataset",
            str(dataset),
            "--out",
            "qa",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("defect", "rule"),
    [
        (box_outside, "box_outside_image=1"),
        (missing_image, "image_unreadable=1"),
        (truncated_png, "image_unreadable=1"),
    ],
)
def test_gate_fails_with_reasons_and_no_manifest(tmp_path, defect, rule):
    dataset = make_dataset(tmp_path / "d", [defect])
    proc = run_stage(tmp_path, dataset, max_error_rate=0.0)
    assert proc.returncode == 1, proc.stderr
    assert "label QA gate: error rate 8.33% exceeds label_qa.max_error_rate=0.00%" in proc.stderr
    assert rule in proc.stderr and "report.md" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "qa" / "manifest.json").exists()
    assert not (tmp_path / "qa" / "metrics.json").exists()
    report = json.loads((tmp_path / "qa" / "report.json").read_text())  # complete, parseable
    assert len(report) == 1
    assert not list((tmp_path / "qa").glob(".tmp-*"))


def test_gate_passes_under_the_threshold_and_drops_the_bad_box(tmp_path):
    proc = run_stage(tmp_path, make_dataset(tmp_path / "d", [box_outside]), max_error_rate=0.1)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "qa" / "manifest.json").read_text())
    assert [a["id"] for a in manifest["splits"]["train"]["annotations"]] == [2, 3, 4]
