"""Ultralytics' own OpenVINO FP32/INT8 export as the reference row: a real tiny YOLOv8n trained by
Ultralytics' trainer (from yolov8n.yaml, 1 epoch, 64 px, 32 images), exported by Ultralytics and
measured with the project's metrics, with every network call failing loudly."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tasks.datasets import digits as data
from tasks.datasets.coco import resolve_image
from tasks.harness.errors import ConfigError, DataError
from tasks.metrics.detection import coco_metrics, predict
from tasks.models import ultralytics_export as ulex
from tasks.models import ultralytics_io as ulio
from tasks.models import ultralytics_ref as ref
from tests.conftest import small_data_cfg


@pytest.fixture(scope="module")
def network_attempts():
    """Every DNS lookup or internet connection made while the module's tests run, refused."""
    attempts: list[str] = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"connect {address}")
            raise OSError(f"test_ultralytics_ref: network access attempted: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(f"getaddrinfo {host}")
        raise OSError(f"test_ultralytics_ref: DNS lookup attempted: {host}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, network_attempts):
    """(manifest, data.yaml) of a small digits dataset: train 32, val 8, test 8, 64 px."""
    work = tmp_path_factory.mktemp("ulref")
    data.run(small_data_cfg(train_images=32, val_images=8, test_images=8), out_dir=work / "coco")
    splits = {s: json.loads((work / "coco" / f"{s}.json").read_text()) for s in ulio.SPLITS}
    manifest = {"root": str(work / "coco"), "splits": splits}
    (work / "manifest.json").write_text(json.dumps(manifest))
    return manifest, ulio.write_yolo_dataset(manifest, work / "yolo")


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory, dataset):
    """A real best.pt from Ultralytics' own trainer."""
    ref.offline_ultralytics()
    from ultralytics import YOLO

    runs = tmp_path_factory.mktemp("runs")
    YOLO("yolov8n.yaml").train(
        data=str(dataset[1]), epochs=1, imgsz=64, batch=16, workers=0, plots=False, amp=False,
        device="cpu", project=str(runs), name="t", seed=0, verbose=False,
    )  # fmt: skip
    return runs / "t" / "weights" / "best.pt"


CFG = ulex.ReferenceCfg(imgsz=64, threads=1, warmup=2, runs=20, rounds=2)


def project_checkpoint(best_pt, categories, path):
    """The trained model as the yolo family saves it (tasks/models/yolo.py: C2f layers split,
    state_dict + model yaml + widths, loadable with weights_only=True), and the Ultralytics
    model it came from."""
    from ultralytics import YOLO

    from tasks.models import adapter_for
    from tasks.models.config import ModelCfg

    adapter = adapter_for(ModelCfg(family="yolo", path=str(best_pt.parent), weights=str(best_pt)))
    model = adapter.build(num_classes=len(categories), input_size=64, seed=0)
    assert any(type(m).__name__ == "C2fSplit" for m in model.model)  # the family's rewrite
    adapter.save(path, model.eval(), categories, {})
    return YOLO(str(best_pt)).model, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset, best_pt):
    """bench_reference on the project checkpoint of the trained model: (result, export folder,
    results JSON)."""
    work = tmp_path_factory.mktemp("export")
    manifest, data_yaml = dataset
    cats = sorted(manifest["splits"]["train"]["categories"], key=lambda c: c["id"])
    _, ckpt = project_checkpoint(best_pt, cats, work / "model.pt")
    out = work / "bench" / "ultralytics-reference.json"
    manifest_path = data_yaml.parent.parent / "manifest.json"
    result = ref.bench_reference(
        ckpt, manifest_path, out, CFG, work=work / "ir", others={"eager": eager_runner(best_pt)}
    )
    return result, work / "ir", out


def eager_runner(best_pt):
    """Ultralytics' PyTorch model + its NMS, as a project runner (timed beside the exports)."""
    from ultralytics import YOLO

    model = YOLO(str(best_pt)).model.eval()

    def run(x):
        with torch.no_grad():
            raw = model(torch.from_numpy(x))[0].numpy()
        return ulex.ultralytics_nms(raw, x.shape[-1], CFG)

    return run


def test_yolo_dataset_matches_the_manifest(dataset):
    manifest, data_yaml = dataset
    spec = yaml.safe_load(data_yaml.read_text())
    cats = sorted(manifest["splits"]["train"]["categories"], key=lambda c: c["id"])
    assert spec["names"] == [c["name"] for c in cats]
    root = data_yaml.parent
    for split in ulio.SPLITS:
        coco = manifest["splits"][split]
        images = sorted((root / "images" / split).iterdir())
        assert len(images) == len(coco["images"]) and all(p.is_file() for p in images)
        im = coco["images"][0]
        lines = root / "labels" / split / f"{im['id']}_{im['file_name'].rsplit('/', 1)[-1]}"
        rows = [r.split() for r in lines.with_suffix(".txt").read_text().splitlines()]
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(rows) == len(anns)
        x, y, w, h = anns[0]["bbox"]
        cls = [c["id"] for c in cats].index(anns[0]["category_id"])
        expect = [cls, (x + w / 2) / im["width"], (y + h / 2) / im["height"], w / im["width"]]
        assert [int(rows[0][0]), *map(float, rows[0][1:4])] == pytest.approx(expect, abs=1e-5)


def test_ultralytics_reads_every_box_of_the_written_dataset(dataset):
    ref.offline_ultralytics()
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    manifest, data_yaml = dataset
    spec = check_det_dataset(str(data_yaml))
    for split in ulio.SPLITS:
        ds = YOLODataset(img_path=spec[split], data=spec, augment=False, imgsz=64, prefix=split)
        coco = manifest["splits"][split]
        assert len(ds.labels) == len(coco["images"])
        assert sum(len(lb["cls"]) for lb in ds.labels) == len(coco["annotations"])


GUARD_SCRIPT = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:1])
    raise OSError("network access attempted")
socket.getaddrinfo = refuse
from tasks.models import yolo, ultralytics_ref as ref
yolo._ultralytics()  # the yolo family imports Ultralytics first, without the private folder
ref.offline_ultralytics()
from ultralytics.data.utils import check_det_dataset
check_det_dataset(sys.argv[1])
print("ATTEMPTS", attempts)
"""


def test_no_font_download_whoever_imported_ultralytics_first(tmp_path, dataset):
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}  # not the user's
    env.pop(ref.CONFIG_DIR_ENV, None)
    run = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT, str(dataset[1])],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ATTEMPTS []" in run.stdout, run.stdout[-2000:]


def test_the_reference_can_run_here(monkeypatch):
    assert ulex.skip_reason() is None
    monkeypatch.setattr(ulex, "REQUIRES", (*ulex.REQUIRES, "no_such_package_xyz"))
    assert ulex.skip_reason() == "skipped: no_such_package_xyz not installed"


def test_reference_cfg_follows_params_and_overrides(tiny):
    cfg = ulex.reference_cfg(tiny, threads=1, runs=7)
    assert (cfg.imgsz, cfg.threads, cfg.runs) == (tiny.train.input_size, 1, 7)
    assert cfg.precision == tiny.build_engine.openvino_precision


def test_others_may_not_reuse_a_reference_name(dataset):
    manifest, data_yaml = dataset
    with pytest.raises(ConfigError, match="ultralytics_openvino_int8"):
        ref.ultralytics_int8_reference(
            "w.pt", data_yaml, manifest, CFG, others={"ultralytics_openvino_int8": print}
        )


def test_a_path_escaping_the_root_is_a_data_error(tmp_path, dataset):
    manifest = json.loads(json.dumps(dataset[0]))
    manifest["splits"]["val"]["images"][0]["file_name"] = "../../etc/passwd"
    with pytest.raises(DataError, match=r"splits\.val\.images\[0\].*escapes"):
        ulio.write_yolo_dataset(manifest, tmp_path / "out")


@pytest.mark.slow  # two Ultralytics exports + NNCF: ~30 s on the loaded 2-core machine
def test_reference_measures_fp32_and_int8(reference, dataset, network_attempts):
    result, work, out = reference
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["variants"]
    assert set(rows) == set(ulex.VARIANTS)
    for row in rows.values():
        for key in ("map50", "map50_95", "latency_ms_p50", "latency_ms_p50_with_nms", "size_mb"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["latency_ms_p50"] > 0 and row["macs"] > 0
        assert row["latency_ms_p95_with_nms"] > 0 and row["latency_ms_p95"] > 0
    int8, fp32 = rows["ultralytics_openvino_int8"], rows["ultralytics_openvino_fp32"]
    assert int8["size_mb"] < fp32["size_mb"] / 2
    assert int8["conv_precisions"].get("u8", 0) + int8["conv_precisions"].get("i8", 0) > 0
    assert set(fp32["conv_precisions"]) == {"f32"}
    assert result["test_images"] == len(dataset[0]["splits"]["test"]["images"])
    eager = result["others"]["eager"]  # timed in the same call as the exports
    assert eager["latency_ms_p50"] > 0 and math.isfinite(eager["map50"])
    assert network_attempts == []


@pytest.mark.slow  # two Ultralytics exports + NNCF: ~30 s on the loaded 2-core machine
def test_reference_map_is_the_projects_metric_on_the_test_split(reference, dataset):
    result, work, _ = reference
    manifest, _ = dataset
    test = ref.DetectionSet(manifest, "test", CFG.imgsz)
    xml = next((work / "ultralytics_openvino_int8").rglob("*.xml"))
    rows = predict(ulex.detection_runner(ulex.compile_ir(xml, CFG), CFG), test, batch_size=4)
    assert rows and {r["image_id"] for r in rows} <= set(test.ids)
    metrics = coco_metrics(manifest["splits"]["test"], rows, CFG.score_threshold)
    got = result["variants"]["ultralytics_openvino_int8"]
    assert (got["map50"], got["map50_95"]) == (metrics["map50"], metrics["map50_95"])


@pytest.mark.slow  # two Ultralytics exports + NNCF: ~30 s on the loaded 2-core machine
def test_the_export_sees_what_ultralytics_predictor_sees(reference, dataset, best_pt):
    """The project's input tensor is what Ultralytics' own predictor makes of the image file
    (64 px: no letterbox), and the FP32 export's raw output on it is the PyTorch model's."""
    import cv2
    from ultralytics import YOLO

    result, work, _ = reference
    manifest, _ = dataset
    test = ref.DetectionSet(manifest, "test", CFG.imgsz)
    x = test.batch(slice(0, 1))
    path = resolve_image(manifest["root"], test.coco["images"][0]["file_name"], work, "test")
    yolo = YOLO(str(best_pt))
    yolo.predict(str(path), imgsz=64, verbose=False)  # sets up Ultralytics' predictor
    theirs = yolo.predictor.preprocess([cv2.imread(str(path))])
    np.testing.assert_allclose(x, theirs.numpy(), atol=1e-6)
    xml = next((work / "ultralytics_openvino_fp32").rglob("*.xml"))
    raw = ulex.raw_runner(ulex.compile_ir(xml, CFG))(x)
    with torch.no_grad():
        expect = yolo.model.eval()(torch.from_numpy(x))[0].numpy()
    assert raw.shape == expect.shape == (1, 4 + 10, sum((64 // s) ** 2 for s in (8, 16, 32)))
    np.testing.assert_allclose(raw[:, 4:], expect[:, 4:], atol=1e-5)  # class scores
    np.testing.assert_allclose(raw[:, :4], expect[:, :4], atol=1e-2)  # xywh, input pixels


def test_ultralytics_nms_suppresses_clips_and_pads():
    """Two overlapping boxes of one class (the weaker one suppressed), one of another class
    reaching past the 64 px input (clipped), one under the score floor (dropped)."""
    ref.offline_ultralytics()
    raw = np.zeros((1, 4 + 2, 4), np.float32)  # (B, 4 + C, N): cx cy w h, then class scores
    raw[0, :4] = np.array([[20, 21, 60, 30], [20, 20, 10, 80], [20, 20, 10, 20], [5, 5, 4, 4]]).T
    raw[0, 4:, 0] = [0.9, 0.0]
    raw[0, 4:, 1] = [0.0, 0.8]
    raw[0, 4:, 2] = [0.0, 0.0]
    raw[0, 4:, 3] = [0.0005, 0.0]  # under conf 0.001
    raw[0, :4, 2] = [20, 21, 60, 30]
    raw[0, 4:, 2] = [0.7, 0.0]  # IoU ~0.9 with box 0, same class: suppressed
    cfg = CFG.model_copy(update={"max_det": 5})
    num, boxes, scores, classes = ulex.ultralytics_nms(raw, 64, cfg)
    assert num.tolist() == [2] and boxes.shape == (1, 5, 4)
    np.testing.assert_allclose(scores[0], [0.9, 0.8, 0, 0, 0], atol=1e-6)
    assert classes[0, :2].tolist() == [0, 1]
    np.testing.assert_allclose(boxes[0, 0], [0, 6, 50, 36], atol=1e-4)  # x0 -10 clipped to 0
    np.testing.assert_allclose(boxes[0, 1], [15, 0, 25, 60], atol=1e-4)  # y -20..60 clipped


def test_project_checkpoint_becomes_an_ultralytics_pt(tmp_path, best_pt, dataset):
    from ultralytics import YOLO

    categories = sorted(dataset[0]["splits"]["train"]["categories"], key=lambda c: c["id"])
    model, saved = project_checkpoint(best_pt, categories, tmp_path / "model.pt")
    ckpt = torch.load(saved, weights_only=True)
    pt = ulio.to_ultralytics_pt(ckpt, tmp_path / "u.pt")
    rebuilt = YOLO(str(pt)).model
    assert rebuilt.names == {i: c["name"] for i, c in enumerate(categories)}
    theirs, ours = model.state_dict(), rebuilt.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k].float(), ours[k].float()) for k in theirs)
    assert type(rebuilt.model[2]).__name__ == "C2f"  # Ultralytics' own layers again
    pruned = {**ckpt, "state_dict": {**ckpt["state_dict"]}}
    key = "model.0.conv.weight"
    pruned["state_dict"][key] = pruned["state_dict"][key][:8]
    with pytest.raises(DataError, match=r"c\.pt: weights do not fit .*pruned"):
        ulio.to_ultralytics_pt(pruned, tmp_path / "y.pt", source=Path("c.pt"))
    with pytest.raises(DataError, match=r"c\.pt: expected a yolo-family checkpoint"):
        ulio.to_ultralytics_pt({"family": "centernet"}, tmp_path / "x.pt", source=Path("c.pt"))
