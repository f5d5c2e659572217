"""A user's own data is a params change: the pipeline's first stages run on a YOLO-format copy of
the tiny data (`dataset.format: yolo`, no dvc.yaml edit), and a changed label re-runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.datasets import digits as data
from tasks.harness.config import DataCfg
from tasks.harness.project import copy_project, dvc
from tasks.models.ultralytics_io import SPLITS, write_yolo_dataset
from tests.conftest import tiny_params

pytestmark = pytest.mark.slow


def coco_to_yolo(src: Path, dst: Path) -> None:
    """Write the COCO splits under `src` in the Ultralytics layout under `dst` (copies: the
    project reads the dataset as a user's folder)."""
    splits = {s: json.loads((src / f"{s}.json").read_text()) for s in SPLITS}
    write_yolo_dataset({"root": str(src), "splits": splits}, dst, link=False)


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
