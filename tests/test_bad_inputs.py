"""The bad-input catalogue: every bad input we know of, through the real entry points.

Each case runs `python -m tasks.<stage>` in a subprocess on tiny inputs and checks what a user
sees: a non-zero exit with exactly one `error:` line naming the file or key (or, for label
problems, a finding in label QA's report), no Python traceback, and no half-written output.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasks.harness.project import profile_params
from tests.conftest import small_data_cfg


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: tiny params, a small dataset, its manifest, a truncated ONNX, a garbage
    checkpoint."""
    from tasks import label_qa
    from tasks.datasets import digits as data
    from tasks.harness.config import Params
    from tasks.models.centernet import CenterNetAdapter, Detector, DetectorConfig
    from tasks.models.config import CenterNetCfg
    from tasks.models.onnx_export import to_onnx

    ws = tmp_path_factory.mktemp("bad-inputs")
    params = profile_params("tiny")
    params["dataset"]["path"] = str(ws / "data")
    params["label_qa"]["max_error_rate"] = 1.0
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = Params.model_validate(params)
    data.run(small_data_cfg(), out_dir=ws / "data")
    _, manifest, _ = label_qa.run(cfg.label_qa, dataset=ws / "data")
    (ws / "manifest.json").write_text(json.dumps(manifest))
    to_onnx(
        CenterNetAdapter(CenterNetCfg()),
        Detector(DetectorConfig(input_size=32, width=0.25)),
        cfg.export.model_copy(update={"simplifier": "none"}),
        ws / "model.onnx",
    )
    blob = (ws / "model.onnx").read_bytes()
    (ws / "trunc.onnx").write_bytes(blob[: len(blob) // 2])
    (ws / "garbage.pt").write_bytes(bytes(range(256)) * 64)
    return ws


def params_with(ws: Path, name: str, mutate) -> str:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    mutate(params)
    (ws / name).write_text(yaml.safe_dump(params, sort_keys=False) if params else "")
    return name


def manifest_without_boxes(ws: Path, split: str) -> str:
    m = json.loads((ws / "manifest.json").read_text())
    m["splits"][split]["annotations"] = []
    name = f"manifest-no-{split}.json"
    (ws / name).write_text(json.dumps(m))
    return name


def dataset_with(ws: Path, name: str, train_json: bytes) -> str:
    """A copy of the small dataset whose train.json is `train_json`."""
    if not (ws / name).exists():
        shutil.copytree(ws / "data", ws / name)
    (ws / name / "train.json").write_bytes(train_json)
    return name


def escaping_path(ws: Path) -> bytes:
    train = json.loads((ws / "data" / "train.json").read_text())
    train["images"][0]["file_name"] = "../../../etc/passwd"
    return json.dumps(train).encode()


def stage(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def _typo(params):
    params["train"]["epoch"] = 3


def _pop(section):
    return lambda p: p.pop(section)


# (case, argv builder, text the one error line must hold, outputs that must not exist)
CASES = [
    (
        "empty params.yaml: promote refuses to run on built-in defaults",
        lambda ws: ["tasks.promote", "--params", params_with(ws, "empty.yaml", dict.clear)],
        "empty.yaml: promote, project, build_engine, export: section missing",
        ["artifacts/promote"],
    ),
    (
        "params.yaml without the stage's section",
        lambda ws: (
            ["tasks.train", "--params", params_with(ws, "p1.yaml", _pop("train"))]
            + ["--manifest", "manifest.json", "--out", "out/train"]
        ),
        "p1.yaml: train: section missing",
        ["out/train"],
    ),
    (
        "shell command in dataset.path",
        lambda ws: [
            "tasks.ingest",
            "--params",
            params_with(ws, "p2.yaml", lambda p: p["dataset"].update(path="d$(touch pwned)")),
            "--out",
            "out/ingest",
        ],
        "p2.yaml: dataset.path:",
        ["out/ingest", "pwned"],
    ),
    (
        "params typo (an unknown key)",
        lambda ws: (
            ["tasks.train", "--params", params_with(ws, "p4.yaml", _typo)]
            + ["--manifest", "manifest.json", "--out", "out/train-typo"]
        ),
        "p4.yaml: train.epoch: unknown key",
        ["out/train-typo"],
    ),
    (
        "params value out of range",
        lambda ws: [
            "tasks.prune",
            "--params",
            params_with(ws, "p5.yaml", lambda p: p["prune"].update(macs_reduction=1.5)),
            "--out",
            "out/prune-range",
        ],
        "p5.yaml: prune.macs_reduction: Input should be less than 0.95",
        ["out/prune-range"],
    ),
    (
        "non-UTF-8 COCO file",
        lambda ws: (
            ["tasks.label_qa", "--dataset", dataset_with(ws, "d1", b"\xff\xfe{}")]
            + ["--out", "out/qa-utf8"]
        ),
        "d1/train.json: not UTF-8 text",
        ["out/qa-utf8"],
    ),
    (
        "truncated COCO JSON",
        lambda ws: [
            "tasks.label_qa",
            "--dataset",
            dataset_with(ws, "d2", (ws / "data" / "train.json").read_bytes()[:200]),
            "--out",
            "out/qa-trunc",
        ],
        "d2/train.json: not valid JSON",
        ["out/qa-trunc"],
    ),
    (
        "image path escaping the dataset root",
        lambda ws: (
            ["tasks.label_qa", "--dataset", dataset_with(ws, "d3", escaping_path(ws))]
            + ["--out", "out/qa-escape"]
        ),
        "escapes the dataset root",
        ["out/qa-escape"],
    ),
    (
        "misspelt top-level section",
        lambda ws: [
            "tasks.check_params",
            "--params",
            params_with(ws, "p3.yaml", lambda p: p.update(trian={"epochs": 3})),
        ],
        "p3.yaml: trian: unknown key",
        [],
    ),
    *(
        (
            f"truncated ONNX to build_engine@{target}",
            lambda ws, t=target: (
                ["tasks.build_engine", "--target", t, "--onnx", "trunc.onnx"]
                + ["--out", f"out/be-{t}"]
            ),
            "trunc.onnx: not a valid ONNX model",
            [f"out/be-{target}/engine", f"out/be-{target}/metrics.json"],
        )
        for target in ("onnxruntime", "openvino")
    ),
    (
        "truncated ONNX to quantize",
        lambda ws: (
            ["tasks.quantize", "--onnx", "trunc.onnx", "--manifest", "manifest.json"]
            + ["--out", "out/quantize"]
        ),
        "trunc.onnx: not a valid ONNX model",
        ["out/quantize/model.onnx", "out/quantize/report.json", "out/quantize/.tmp-work"],
    ),
    (
        "garbage checkpoint",
        lambda ws: (
            ["tasks.export", "--checkpoint", "garbage.pt", "--manifest", "manifest.json"]
            + ["--out", "out/export"]
        ),
        "garbage.pt: not a readable Shrinkflow checkpoint",
        ["out/export/model.onnx"],
    ),
    (
        "train split without boxes",
        lambda ws: (
            ["tasks.train", "--manifest", manifest_without_boxes(ws, "train")]
            + ["--out", "out/train-empty"]
        ),
        "splits.train: 0 boxes",
        ["out/train-empty/model.pt", "out/train-empty/metrics.json"],
    ),
    (
        "test split without boxes",
        lambda ws: (
            ["tasks.evaluate", "--target", "onnxruntime", "--engine", "nowhere"]
            + ["--manifest", manifest_without_boxes(ws, "test"), "--out", "out/eval-empty"]
        ),
        "splits.test: 0 boxes",
        ["out/eval-empty/metrics.json"],
    ),
    (
        "shrinkflow bench with a params typo: one line like every stage's",
        lambda ws: ["tasks.cli.app", "bench", "--params", params_with(ws, "p6.yaml", _typo)],
        "p6.yaml: train.epoch: unknown key",
        ["artifacts/bench"],
    ),
    (
        "missing manifest",
        lambda ws: ["tasks.train", "--manifest", "absent.json", "--out", "out/train-absent"],
        "absent.json: file not found",
        ["out/train-absent/model.pt"],
    ),
]


@pytest.mark.parametrize(("case", "argv", "expected", "absent"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_line(ws, case, argv, expected, absent):
    proc = stage(ws, *argv(ws))
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "weights_only" not in proc.stderr
    for path in absent:
        assert not (ws / path).exists(), path


def test_label_faults_are_findings_not_crashes(ws):
    """Negative-width box, repeated image id, repeated annotation id, an image over PIL's pixel
    limit, a missing and a truncated image: label QA reports each under its own rule and
    finishes (no traceback)."""
    root = ws / "faulty"

    shutil.copytree(ws / "data", root)
    train = json.loads((root / "train.json").read_text())
    good = copy.deepcopy(train)
    anns, images = train["annotations"], train["images"]
    anns[0]["bbox"][2] = -5.0  # negative width (crashed render_crop)
    anns[2]["id"] = anns[1]["id"]  # two annotations, one id
    twin = dict(images[1], id=images[0]["id"])  # two images, one id
    Image.new("1", (14000, 14000)).save(root / "bomb.png")  # 196 Mpx: over PIL's limit
    bomb = {"id": 99_999, "file_name": "bomb.png", "width": 14000, "height": 14000}
    missing = dict(images[2], id=99_998, file_name="absent.png")
    (root / "cut.png").write_bytes((root / images[3]["file_name"]).read_bytes()[:60])
    cut = dict(images[3], id=99_997, file_name="cut.png")  # a truncated PNG
    train["images"] = [*images, twin, bomb, missing, cut]
    (root / "train.json").write_text(json.dumps(train))
    proc = stage(ws, "tasks.label_qa", "--dataset", "faulty", "--out", "out/label_qa")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ws / "out/label_qa/report.json").read_text())
    findings = report["findings"] if isinstance(report, dict) else report
    rules = {f["rule"] for f in findings}
    assert {"box_empty", "duplicate_image_id", "duplicate_annotation_id"} <= rules
    unreadable = {f["image_id"] for f in findings if f["rule"] == "image_unreadable"}
    assert {99_999, 99_998, 99_997} <= unreadable
    manifest = json.loads((ws / "out/label_qa/manifest.json").read_text())
    kept = manifest["splits"]["train"]
    ids = [im["id"] for im in kept["images"]]
    assert len(ids) == len(set(ids)) and images[0]["id"] not in ids
    assert not {99_999, 99_998, 99_997} & set(ids)
    ann_ids = [a["id"] for a in kept["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))
    assert len(kept["images"]) < len(good["images"])
