"""A user's own data is a params change: the pipeline's first stages run on a YOLO-format copy of
the tiny data (`dataset.format: yolo`, no dvc.yaml edit), and a changed label re-runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tasks import data
from tasks.config import DataCfg
from tasks.project import copy_project, dvc
from tests.conftest import tiny_params

pytestmark = pytest.mark.slow


def coco_to_yolo(src: Path, dst: Path) -> None:
    """Write the COCO splits under `src` in the Ultralytics layout under `dst`."""
    names = None
    for split in ("train", "val", "test"):
        coco = json.loads((src / f"{split}.json").read_text())
        names = names or [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        index = {
            c["id"]: k for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))
        }
        (dst / "images" / split).mkdir(parents=True)
        (dst / "labels" / split).mkdir(parents=True)
        by_image: dict[int, list] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            name = Path(im["file_name"]).name
            (dst / "images" / split / name).write_bytes((src / im["file_name"]).read_bytes())
            w, h = im["width"], im["height"]
            lines = [
                f"{index[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} "
                f"{a['bbox'][3] / h:.6f}"
                for a in by_image.get(im["id"], [])
            ]
            (dst / "labels" / split / Path(name).with_suffix(".txt")).write_text("\n".join(lines))
    spec = {"path": ".", "train": "images/train", "val": "images/val", "test": "images/test"}
    (dst / "data.yaml").write_text(yaml.safe_dump({**spec, "names": names}))


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_yolo_dataset_runs_through_ingest_label_qa_and_train(tmp_path):
    params = tiny_params()
    params["dataset"] = {"format": "yolo", "path": "data/yolo"}
    params["train"]["epochs"] = 2
    proj = copy_project(tmp_path / "proj", params)
    small = DataCfg(**{**params["data"], "train_images": 48, "val_images": 16, "test_images": 16})
    data.run(small, out_dir=tmp_path / "coco")
    coco_to_yolo(tmp_path / "coco", proj / "data" / "yolo")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = dvc(proj, "repro", "train", env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert ran(first.stdout) == ["ingest", "label_qa", "train"]
    metrics = json.loads((proj / "artifacts/ingest/metrics.json").read_text())
    assert metrics["format"] == "yolo" and metrics["train"]["images"] == 48
    assert metrics["files"] >= 48 + 16 + 16
    assert not list((proj / "artifacts/ingest/builtin").iterdir())
    assert json.loads((proj / "artifacts/train/metrics.json").read_text())
    # a changed label re-runs what reads it, and nothing before
    label = sorted((proj / "data/yolo/labels/train").glob("*.txt"))[0]
    cls, rest = label.read_text().split(" ", 1)
    label.write_text(f"{(int(cls) + 1) % 10} {rest}")
    second = dvc(proj, "repro", "train", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ran(second.stdout) == ["ingest", "label_qa", "train"]
    changed = json.loads((proj / "artifacts/ingest/metrics.json").read_text())
    assert changed["content_md5"] != metrics["content_md5"]
    third = dvc(proj, "repro", "train", env=env)
    assert third.returncode == 0 and ran(third.stdout) == []
