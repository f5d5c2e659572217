"""Label QA: each rule on small hand-made COCO sets with known defects, the policy, the gate,
malformed files, the reports, and the model-based checks (cleanlab) on hand-made predictions and
with a real tiny cross-fitted model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import label_qa
from tasks.harness.config import LabelQaCfg
from tasks.harness.errors import ConfigError, DataError
from tasks.harness.project import ROOT
from tasks.label_qa import core
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.report import write_reports

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
# No model checks (no model to train on 4 images); both classes occur in every split.
CFG = LabelQaCfg(min_class_count=1, model={"enabled": False})


def picture(split: str, i: int) -> np.ndarray:
    """A distinct random texture per (split, image): no two pictures are near-duplicates."""
    seed = [label_qa.SPLITS.index(split), i]
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def make_dataset(root, defects=()):
    """Three splits of 4 images 32x32, each with one good box (classes 1, 2, 1, 2);
    `defects` alter train."""
    root.mkdir(parents=True, exist_ok=True)
    for split in label_qa.SPLITS:
        (root / split).mkdir(exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": CATS}
        for i in range(1, 5):
            name = f"{split}/{i}.png"
            Image.fromarray(picture(split, i)).save(root / name)
            coco["images"].append({"id": i, "file_name": name, "width": 32, "height": 32})
            coco["annotations"].append(
                {"id": i, "image_id": i, "category_id": 2 - i % 2, "bbox": [4, 4, 10, 12]}
            )
        if split == "train":
            for defect in defects:
                defect(root, coco)
        (root / f"{split}.json").write_text(json.dumps(coco))
    return root


def box_outside(root, coco):
    coco["annotations"][0]["bbox"] = [25, 25, 10, 10]


def box_outside_3(root, coco):
    coco["annotations"][2]["bbox"] = [25, 25, 10, 10]


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


def thin_box(root, coco):
    coco["annotations"].append({"id": 98, "image_id": 4, "category_id": 2, "bbox": [1, 1, 2, 30]})


def orphan_annotation(root, coco):
    coco["annotations"].append({"id": 77, "image_id": 1234, "category_id": 1, "bbox": [1, 1, 4, 4]})


def duplicate_box(root, coco):
    coco["annotations"].append({"id": 50, "image_id": 1, "category_id": 1, "bbox": [5, 4, 10, 12]})


def conflicting_box(root, coco):
    coco["annotations"].append({"id": 60, "image_id": 3, "category_id": 2, "bbox": [4, 4, 10, 11]})


def unlabelled_image(root, coco):
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]
    coco["annotations"].append({"id": 5, "image_id": 1, "category_id": 2, "bbox": [18, 18, 8, 8]})


def near_duplicate_image(root, coco):
    """train/3.png becomes train/2.png re-encoded as JPEG and saved back (a near-copy)."""
    jpeg = root / "copy.jpg"
    Image.fromarray(picture("train", 2)).save(jpeg, quality=80)
    Image.open(jpeg).convert("RGB").save(root / coco["images"][2]["file_name"])


def leaked_image(root, coco):
    """train/4.png is test/1.png."""
    Image.fromarray(picture("test", 1)).save(root / coco["images"][3]["file_name"])


def test_clean_dataset_has_no_findings(tmp_path):
    findings, manifest, metrics = label_qa.run(CFG, dataset=make_dataset(tmp_path / "d"))
    assert findings == []
    assert metrics["error_rate"] == 0
    assert len(manifest["splits"]["train"]["annotations"]) == 4
    assert metrics["class_counts"]["val"] == {"a": 2, "b": 2}


@pytest.mark.parametrize(
    ("defect", "expected"),
    [
        (box_outside, [("box_outside_image", 1, 1)]),
        (missing_image, [("image_unreadable", 2, None)]),
        (truncated_png, [("image_unreadable", 3, None)]),
        (wrong_size, [("image_size_mismatch", 4, None)]),
        (unknown_category, [("unknown_category", 2, 2)]),
        (empty_box, [("box_empty", 3, 3)]),
        (tiny_box, [("box_too_small", 4, 99)]),
        (thin_box, [("box_extreme_aspect", 4, 98)]),
        (orphan_annotation, [("unknown_image", 1234, 77)]),
        (duplicate_box, [("duplicate_box", 1, 50)]),
        (conflicting_box, [("conflicting_boxes", 3, 3), ("conflicting_boxes", 3, 60)]),
        (unlabelled_image, [("image_without_annotations", 2, None)]),
        (near_duplicate_image, [("duplicate_image", 3, None)]),
        (leaked_image, [("split_leakage", 4, None)]),
    ],
)
def test_each_rule_finds_its_defect(tmp_path, defect, expected):
    findings, manifest, _ = label_qa.run(CFG, dataset=make_dataset(tmp_path / "d", [defect]))
    assert sorted((f.rule, f.image_id, f.annotation_id) for f in findings) == expected
    assert {f.split for f in findings} == {"train"}
    kept = manifest["splits"]["train"]
    kept_anns = {a["id"] for a in kept["annotations"]}
    for f in findings:
        if f.action == "drop" and f.annotation_id is None:
            assert f.image_id not in {im["id"] for im in kept["images"]}
            assert f.image_id not in {a["image_id"] for a in kept["annotations"]}
        elif f.action == "drop":
            assert f.annotation_id not in kept_anns
        else:
            assert f.annotation_id is None or f.annotation_id in kept_anns


def test_class_below_floor_warns_per_split_and_keeps_everything(tmp_path):
    cfg = CFG.model_copy(update={"min_class_count": 3})
    findings, manifest, metrics = label_qa.run(cfg, dataset=make_dataset(tmp_path / "d"))
    assert sorted((f.rule, f.split, f.message) for f in findings) == sorted(
        ("class_below_floor", s, f"class {c!r} has 2 boxes (< 3)")
        for s in label_qa.SPLITS
        for c in ("a", "b")
    )
    assert metrics["error_rate"] == 0  # a warning
    assert len(manifest["splits"]["train"]["annotations"]) == 4


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        ({}, {1: [25, 25, 7, 7], 2: None, 3: None, 4: None}),  # default: clip / drop
        (
            {"box_outside_image": "drop", "duplicate_box": "keep"},
            {2: None, 3: None, 4: None, 50: None},
        ),
        ({"box_outside_image": "keep"}, {1: [25, 25, 10, 10], 2: None, 3: None, 4: None}),
    ],
)
def test_cleaned_manifest_applies_the_policy_per_rule(tmp_path, policy, kept):
    def duplicate_of_2(root, coco):
        coco["annotations"].append(
            {"id": 50, "image_id": 2, "category_id": 2, "bbox": [4, 4, 10, 12]}
        )

    cfg = CFG.model_copy(update={"policy": policy})
    root = make_dataset(tmp_path / "d", [box_outside, duplicate_of_2])
    findings, manifest, metrics = label_qa.run(cfg, dataset=root)
    assert {f.rule for f in findings} == {"box_outside_image", "duplicate_box"}
    anns = {a["id"]: a for a in manifest["splits"]["train"]["annotations"]}
    assert sorted(anns) == sorted(kept)
    for ann_id, box in kept.items():
        assert anns[ann_id]["bbox"] == (box or [4, 4, 10, 12])
    assert metrics["actions"]["drop"] + metrics["actions"]["fix"] + metrics["actions"]["keep"] == 2
    val = json.loads((root / "val.json").read_text())
    assert [(a["id"], a["bbox"]) for a in manifest["splits"]["val"]["annotations"]] == [
        (a["id"], a["bbox"]) for a in val["annotations"]
    ]


def test_a_policy_for_an_unknown_rule_is_a_config_error(tmp_path):
    cfg = CFG.model_copy(update={"policy": {"box_wobbly": "drop"}})
    with pytest.raises(ConfigError, match="label_qa.policy.box_wobbly: unknown rule; choose one"):
        label_qa.run(cfg, dataset=make_dataset(tmp_path / "d"))


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
                        "images": [],
                        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1]}],
                        "categories": CATS,
                    }
                )
            ),
            "train.json: annotations[0].bbox: List should have at least 4 items",
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
        label_qa.run(CFG, dataset=root)
    assert message in str(err.value)


def test_report_rows_markdown_and_crops(tmp_path):
    root = make_dataset(tmp_path / "d", [box_outside_3, duplicate_box, missing_image])
    result = label_qa.run(CFG, dataset=root)
    out = tmp_path / "qa"
    rows = write_reports(
        result.findings,
        result.metrics,
        paths=result.image_paths(),
        boxes=result.boxes(),
        sources={},
        out_dir=out,
    )
    assert json.loads((out / "report.json").read_text()) == rows
    assert {r["rule"] for r in rows} == {"box_outside_image", "duplicate_box", "image_unreadable"}
    for r in rows:
        assert {"image_id", "annotation_id", "rule", "severity", "score", "suggested_fix"} <= set(r)
    outside = next(r for r in rows if r["rule"] == "box_outside_image")
    assert outside["suggested_fix"] == {"bbox": [25, 25, 7, 7]} and outside["action"] == "fix"
    md = (out / "report.md").read_text()
    crops = sorted((out / "images").glob("*.png"))
    assert len(crops) == 2  # the unreadable image has nothing to show
    for c in crops:
        assert f"](images/{c.name})" in md
        assert Image.open(c).size[0] > 0
    crop = np.asarray(Image.open(next(c for c in crops if "box_outside" in c.name)))
    red = (crop[..., 0] > 200) & (crop[..., 1] < 80)
    green = (crop[..., 1] > 180) & (crop[..., 0] < 80)
    assert red.any() and green.any()  # the labelled box and the suggested one are drawn
    assert (out / "plots" / "findings.csv").read_text().startswith("rule,findings\n")


def _oracle_predictions(ctx, split, truth):
    """cleanlab-format predictions that see exactly `truth` (image id -> [(class, xywh)])."""
    cats = sorted(c.id for c in ctx.splits[split].coco.categories)
    preds = {}
    for image_id in ctx.splits[split].images:
        per_class = [[] for _ in cats]
        for cat, (x, y, w, h) in truth.get(image_id, []):
            per_class[cats.index(cat)].append([x, y, x + w, y + h, 0.97])
        preds[image_id] = [np.array(p, np.float32).reshape(-1, 5) for p in per_class]
    return preds


def test_model_rules_flag_swaps_misplaced_and_missing_boxes_from_predictions(tmp_path):
    """cleanlab's ObjectLab scores on hand-made predictions: the model sees the true objects;
    train's labels have one wrong class, one shifted box, and one missing box."""

    def corrupt(root, coco):
        coco["annotations"][0]["category_id"] = 2  # image 1: the object is class 1
        coco["annotations"][1]["bbox"] = [12, 12, 10, 12]  # image 2: the object is at 4, 4
        coco["annotations"].append(
            {"id": 5, "image_id": 3, "category_id": 2, "bbox": [18, 2, 10, 10]}
        )

    root = make_dataset(tmp_path / "d", [corrupt])
    truth = {i: [(2 - i % 2, [4, 4, 10, 12])] for i in range(1, 5)}
    truth[3].append((2, [18, 2, 10, 10]))
    truth[4].append((1, [18, 18, 10, 10]))  # labelled nowhere: missing
    cfg = CFG.model_copy(
        update={
            "model": CFG.model.model_copy(update={"enabled": True}),
            "policy": {"box_missing": "fix", "label_wrong_class": "fix", "box_badly_placed": "fix"},
        }
    )
    ctx = core.QaContext(cfg, root, {s: core.load_split(root, s) for s in label_qa.SPLITS})
    ctx.interim = core.apply_policy(ctx, [])
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", truth)}
    findings = core.run_rules(ctx, phase=2)
    got = {(f.rule, f.image_id, f.annotation_id): f for f in findings}
    assert sorted(got) == [
        ("box_badly_placed", 2, 2),
        ("box_missing", 4, None),
        ("label_wrong_class", 1, 1),
    ]
    assert got[("label_wrong_class", 1, 1)].fix["category_id"] == 1
    assert got[("box_badly_placed", 2, 2)].fix == {"bbox": [4.0, 4.0, 10.0, 12.0]}
    assert got[("box_missing", 4, None)].fix == {
        "add": {"category_id": 1, "bbox": [18.0, 18.0, 10.0, 10.0]}
    }
    cleaned = core.apply_policy(ctx, findings)["train"]["annotations"]
    by_image = {}
    for a in cleaned:
        by_image.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"]))
    assert by_image[1] == [(1, [4, 4, 10, 12])]
    assert by_image[2] == [(2, [4.0, 4.0, 10.0, 12.0])]
    assert sorted(by_image[4]) == [(1, [18.0, 18.0, 10.0, 10.0]), (2, [4, 4, 10, 12])]
    # by default the model's suggestions are applied on train ...
    ctx.cfg = CFG.model_copy(update={"model": cfg.model})
    default = core.run_rules(ctx, phase=2)
    assert [(f.rule, f.action) for f in default] == [(f.rule, f.action) for f in findings]
    # ... and only reported in the splits outside label_qa.model.apply_splits
    elsewhere = cfg.model.model_copy(update={"apply_splits": ["val", "test"]})
    ctx.cfg = CFG.model_copy(update={"model": elsewhere})
    reported = core.run_rules(ctx, phase=2)
    assert {(f.rule, f.image_id, f.annotation_id) for f in reported} == set(got)
    assert all(f.action == "keep" for f in reported)
    assert (
        core.apply_policy(ctx, reported)["train"]["annotations"]
        == (core.apply_policy(ctx, [])["train"]["annotations"])
    )


def run_stage(tmp_path, dataset, max_error_rate, **label_qa_params):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["label_qa"]["max_error_rate"] = max_error_rate
    params["label_qa"]["model"] = {"enabled": False}
    params["label_qa"]["min_class_count"] = 1
    params["label_qa"].update(label_qa_params)
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
    assert f"rules that tripped: {rule};" in proc.stderr
    assert "qa/report.md" in proc.stderr and "qa/report.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "qa" / "manifest.json").exists()
    assert not (tmp_path / "qa" / "metrics.json").exists()
    report = json.loads((tmp_path / "qa" / "report.json").read_text())  # complete, parseable
    assert len(report) == 1
    assert not list((tmp_path / "qa").glob(".tmp-*"))


def test_gate_passes_under_the_threshold_and_writes_every_output(tmp_path):
    proc = run_stage(
        tmp_path,
        make_dataset(tmp_path / "d", [box_outside_3, duplicate_box]),
        max_error_rate=0.2,
        policy={"box_outside_image": "drop"},
    )
    assert proc.returncode == 0, proc.stderr
    qa = tmp_path / "qa"
    manifest = json.loads((qa / "manifest.json").read_text())
    assert [a["id"] for a in manifest["splits"]["train"]["annotations"]] == [1, 2, 4]
    metrics = json.loads((qa / "metrics.json").read_text())
    assert metrics["findings_per_rule"]["duplicate_box"] == 1
    assert metrics["error_rate"] == pytest.approx(2 / 12)
    assert len(list((qa / "images").glob("*.png"))) == 2
    for name in ("report.json", "report.md", "meta.json", "plots/findings.csv"):
        assert (qa / name).exists(), name


@pytest.mark.slow
def test_cross_fit_on_a_tiny_noisy_set_finds_injected_errors(tmp_path, tiny):
    """The whole model path: inject noise, cross-fit a real tiny detector (K=2), score with
    cleanlab, and check the findings against the injected ground truth."""
    from tasks.datasets import digits as data
    from tasks.label_qa.bench import score_findings

    noise = {"class_swap": 0.08, "shift": 0.08, "drop": 0.08}
    root = tmp_path / "noisy"
    data.run(
        tiny.data.model_copy(update={"noise": tiny.data.noise.model_copy(update=noise)}),
        out_dir=root,
    )
    injected = json.loads((root / data.NOISE_FILE).read_text())["injected"]
    assert {r["kind"] for r in injected} == set(noise)
    cfg = tiny.label_qa.model_copy(
        update={
            "model": tiny.label_qa.model.model_copy(
                # min_map50 low: this tiny model is weak (~0.1), yet it must find errors
                update={
                    "enabled": True,
                    "folds": 2,
                    "epochs": 12,
                    "input_size": 64,
                    "min_map50": 0.05,
                }
            )
        }
    )
    result = label_qa.run(cfg, dataset=root, train_cfg=tiny.train)
    assert result.ctx.prediction_source == {
        "train": "cross-fit (2 folds)",
        "val": "cross-fit (last fold model)",
        "test": "cross-fit (last fold model)",
    }
    assert result.metrics["crossfit_map50"] >= 0.05
    train_ids = {im.id for im in result.ctx.splits["train"].coco.images}
    assert set(result.ctx.predictions["train"]) == train_ids  # every train image out-of-fold
    model_findings = [
        f
        for f in result.findings
        if f.rule in ("label_wrong_class", "box_badly_placed", "box_missing")
    ]
    assert model_findings
    score = score_findings(result.findings, injected)
    # a 2-fold, 12-epoch 64-px model is weak: far better than chance is what is asserted
    assert score["precision"] >= 0.4, score
    assert score["recall"] >= 0.3, score
    evidence = result.metrics["fix_evidence"]
    assert set(evidence) == {"label_wrong_class", "box_badly_placed", "box_missing"}
    for f in model_findings:
        assert 0 <= f.score < 1 and f.severity == "warning" and f.fix, f
        proven = evidence[f.rule]["acts"]
        expected = label_qa.RULES[f.rule].policy if f.split == "train" and proven else "keep"
        assert f.action == expected, f  # val/test: reported only (label_qa.model.apply_splits)
        if f.split == "train" and not proven:  # unproven: reported, and the report says why
            assert "precision" in f.note or "too few" in f.note or "no fix" in f.note, f


@pytest.mark.server
def test_champion_onnx_is_downloaded_from_the_registry_and_run(
    tmp_path, monkeypatch, mlflow_server
):
    from mlflow.tracking import MlflowClient

    from tasks.harness.config import ExportCfg
    from tasks.label_qa.__main__ import champion_runner
    from tasks.models.centernet import CenterNetAdapter, Detector, DetectorConfig
    from tasks.models.config import CenterNetCfg
    from tasks.models.onnx_export import to_onnx

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = "label-qa-champion-test"
    assert champion_runner(name, tmp_path / "none") is None  # no such model: cross-fit only
    onnx = tmp_path / "model" / "model.onnx"
    onnx.parent.mkdir()
    adapter = CenterNetAdapter(CenterNetCfg())
    to_onnx(adapter, Detector(DetectorConfig(10, 64, 0.25, 1)).eval(), ExportCfg(), onnx)
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("label-qa-champion-test")
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(onnx.parent), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    assert champion_runner(name, tmp_path / "no-alias") is None  # registered, no champion yet
    client.set_registered_model_alias(name, "champion", version.version)
    runner, size, got = champion_runner(name, tmp_path / "work")
    assert (size, got) == (64, version.version)
    num, boxes, scores, classes = runner(np.random.default_rng(0).random((2, 3, 64, 64)))
    assert num.shape == (2,) and boxes.shape[0] == 2 and boxes.shape[2] == 4


def test_injected_noise_matches_its_ground_truth(tmp_path):
    from tasks.datasets import digits as data
    from tests.conftest import small_data_cfg

    rates = {"class_swap": 0.1, "shift": 0.1, "scale": 0.1, "drop": 0.1, "duplicate": 0.1}
    clean_cfg = small_data_cfg(train_images=40)
    noisy_cfg = clean_cfg.model_copy(update={"noise": clean_cfg.noise.model_copy(update=rates)})
    data.run(clean_cfg, out_dir=tmp_path / "clean")
    data.run(noisy_cfg, out_dir=tmp_path / "noisy")
    assert json.loads((tmp_path / "clean" / data.NOISE_FILE).read_text())["injected"] == []
    truth = json.loads((tmp_path / "noisy" / data.NOISE_FILE).read_text())["injected"]
    clean = {
        a["id"]: a for a in json.loads((tmp_path / "clean/train.json").read_text())["annotations"]
    }
    noisy = {
        a["id"]: a for a in json.loads((tmp_path / "noisy/train.json").read_text())["annotations"]
    }
    n = round(0.1 * len(clean))
    assert n > 0 and {k: sum(r["kind"] == k for r in truth) for k in rates} == dict.fromkeys(
        rates, n
    )
    assert {r["split"] for r in truth} == {"train"}  # val/test stay clean by default
    touched = {r["annotation_id"] for r in truth}
    assert len(touched) == len(truth)  # no box gets two kinds
    for r in truth:
        if r["kind"] == "drop":
            assert r["annotation_id"] not in noisy and r["noisy"] is None
            continue
        got = noisy[r["annotation_id"]]
        assert {"category_id": got["category_id"], "bbox": got["bbox"]} == r["noisy"]
        if r["kind"] == "duplicate":
            assert r["annotation_id"] not in clean and r["original"] is None
            continue
        before = clean[r["annotation_id"]]
        assert r["original"] == {"category_id": before["category_id"], "bbox": before["bbox"]}
        if r["kind"] == "class_swap":
            assert got["category_id"] != before["category_id"] and got["bbox"] == before["bbox"]
        else:  # shifted or scaled: same class, a box that overlaps the object poorly
            iou = core.boxes.iou_matrix(np.array([got["bbox"]]), np.array([before["bbox"]]))[0, 0]
            assert got["category_id"] == before["category_id"] and iou < 0.6
    for ann_id in set(clean) - touched:
        assert noisy[ann_id] == clean[ann_id]
    for split in ("train", "val", "test"):  # the pictures are the same
        a, b = (sorted((tmp_path / d / "images" / split).iterdir()) for d in ("clean", "noisy"))
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_calibration_maps_detector_scores_to_hit_rates():
    from tasks.label_qa.crossfit import calibrate

    coco = {
        "categories": [{"id": 1}],
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]}],
    }
    hit, miss = [0, 0, 10, 10], [50, 50, 60, 60]
    # raw scores 0.3 are always right, 0.2 never: calibrated to 1 and 0
    preds = {1: [np.array([[*hit, 0.3], [*miss, 0.2], [*miss, 0.21]], np.float32)]}
    out = calibrate(preds, coco)
    assert out[1][0][:, 4].tolist() == [1.0, 0.0, 0.0]
    assert out[1][0][:, :4].tolist() == preds[1][0][:, :4].tolist()


def test_model_checks_are_skipped_when_the_fold_models_cannot_detect(tmp_path):
    """Four 32-px noise images cannot teach a detector anything: its held-out mAP is under
    label_qa.model.min_map50, so it judges nothing (no false findings, no tripped gate)."""
    from tasks.harness.config import TrainCfg

    cfg = CFG.model_copy(
        update={
            "model": CFG.model.model_copy(
                update={"enabled": True, "folds": 2, "epochs": 1, "input_size": 32}
            )
        }
    )
    result = label_qa.run(
        cfg, dataset=make_dataset(tmp_path / "d"), train_cfg=TrainCfg(batch_size=2)
    )
    assert result.findings == []
    assert result.metrics["crossfit_map50"] < cfg.model.min_map50
    assert result.ctx.prediction_source["train"].startswith("none: cross-fit held-out mAP@0.5")
    assert "val" not in result.ctx.prediction_source


def test_box_classifier_finds_swapped_classes_no_detection_disputes(tmp_path):
    """Real digits with 8% of the train classes swapped and a detector that sees nothing (so
    ObjectLab has no evidence): the out-of-fold box classifier + confident learning finds the
    swaps and suggests the original class; switched off, it finds none."""
    from tasks.datasets import digits as data
    from tests.conftest import small_data_cfg

    cfg = small_data_cfg(train_images=400, clutter=0)
    root = tmp_path / "noisy"
    data.run(
        cfg.model_copy(update={"noise": cfg.noise.model_copy(update={"class_swap": 0.08})}),
        out_dir=root,
    )
    injected = json.loads((root / data.NOISE_FILE).read_text())["injected"]
    original = {r["annotation_id"]: r["original"]["category_id"] for r in injected}
    qa = LabelQaCfg(model={"enabled": True, "folds": 3})
    ctx = core.QaContext(qa, root, {s: core.load_split(root, s) for s in label_qa.SPLITS})
    ctx.interim = core.apply_policy(ctx, [])
    ids = sorted(ctx.splits["train"].images)
    ctx.crossfit_folds = [ids[k::3] for k in range(3)]
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", {})}  # sees nothing
    found = {f.annotation_id: f for f in core.run_rules(ctx, phase=2)}
    assert ctx.box_accuracy >= qa.model.min_box_accuracy
    assert all(f.rule == "label_wrong_class" for f in found.values())
    right = [i for i in found if i in original]
    assert len(right) >= 0.8 * len(original), (len(right), len(original))
    assert len(right) >= 0.8 * len(found), (len(right), len(found))
    assert sum(found[i].fix["category_id"] == original[i] for i in right) >= 0.8 * len(right)
    ctx.cfg = qa.model_copy(update={"model": qa.model.model_copy(update={"box_classifier": False})})
    ctx.model_scores = {}
    assert core.run_rules(ctx, phase=2) == []


# --- proof before a fix (probe.py), colour-aware evidence, names, the review loop -------------


def _shapes_ctx(tmp_path, noise=None, train_images=200, **model):
    """Coloured shapes (class = colour) with a label-QA context ready for the model rules."""
    from tasks.datasets.shapes import ShapesCfg, generate

    root = tmp_path / "shapes"
    generate(
        ShapesCfg(train_images=train_images, val_images=2, test_images=2, noise=noise or {}), root
    )
    qa = LabelQaCfg(model={"enabled": True, "folds": 3, **model})
    ctx = core.QaContext(qa, root, {s: core.load_split(root, s) for s in label_qa.SPLITS})
    ctx.interim = core.apply_policy(ctx, [])
    ids = sorted(ctx.splits["train"].images)
    ctx.crossfit_folds = [ids[k::3] for k in range(3)]
    injected = json.loads((root / "noise.json").read_text())["injected"]
    return ctx, injected


def _truth(ctx, swap_every=0):
    """image id -> [(class, xywh)] of the labelled train boxes; every `swap_every`-th box is
    seen as the next class instead (a detector confidently wrong on correct labels)."""
    truth, cats = {}, sorted(c.id for c in ctx.splits["train"].coco.categories)
    for n, a in enumerate(ctx.splits["train"].coco.annotations):
        cat = a.category_id
        if swap_every and n % swap_every == 0:
            cat = cats[(cats.index(cat) + 1) % len(cats)]
        truth.setdefault(a.image_id, []).append((cat, list(a.bbox)))
    return truth


def test_on_clean_colour_data_the_default_policy_changes_no_label(tmp_path):
    """Classes that differ only by colour, no noise, a detector that sees nothing: the box
    classifier picks colour features out of fold and finds nothing to change."""
    ctx, _ = _shapes_ctx(tmp_path)
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", {})}
    findings = core.model_findings(ctx)
    assert ctx.box_features != "grey16"  # grey crops cannot tell red from green
    assert ctx.box_feature_accuracy[ctx.box_features] > ctx.box_feature_accuracy["grey16"] + 0.3
    assert core.apply_policy(ctx, findings)["train"] == core.apply_policy(ctx, [])["train"]
    assert not [f for f in findings if f.action != "keep"]
    evidence = ctx.fix_evidence["label_wrong_class"]
    assert evidence["injected"] >= 10 and evidence["recall"] >= 0.9, evidence


def test_on_colour_data_with_swaps_the_rules_find_them_and_fix_them_right(tmp_path):
    ctx, injected = _shapes_ctx(tmp_path, noise={"class_swap": 0.1})
    original = {r["annotation_id"]: r["original"]["category_id"] for r in injected}
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", {})}
    findings = [f for f in core.model_findings(ctx) if f.rule == "label_wrong_class"]
    on_swaps = [f for f in findings if f.annotation_id in original]
    assert len(on_swaps) >= 0.9 * len(original), (len(on_swaps), len(original))
    right = [f for f in findings if f.fix["category_id"] == original.get(f.annotation_id)]
    assert len(right) >= 0.9 * len(findings), (len(right), len(findings))
    applied = [f for f in findings if f.action == "fix"]
    assert sum(f.fix["category_id"] == original.get(f.annotation_id) for f in applied) >= (
        0.9 * len(applied)
    )
    names = {"'red'", "'green'", "'blue'"}
    assert all(sum(n in f.message for n in names) == 2 for f in findings), findings[0].message


def test_a_model_that_rewrites_correct_labels_is_measured_and_only_reports(tmp_path):
    """The failure the probe exists for: a detector confidently sees the wrong class on 1 in 8
    correctly labelled boxes. Its swap findings look certain, but on the injected copy those
    same changes count as wrong, so it reports and changes nothing. Each rule is measured on
    its own: moving boxes onto the detector's (right) boxes is proven."""
    ctx, _ = _shapes_ctx(tmp_path, box_classifier=False)
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", _truth(ctx, swap_every=8))}
    findings = core.model_findings(ctx)
    wrong = [f for f in findings if f.rule == "label_wrong_class"]
    assert len(wrong) >= 0.1 * len(ctx.splits["train"].coco.annotations)
    assert all(f.action == "keep" and "precision" in f.note for f in wrong), wrong[0]
    evidence = ctx.fix_evidence
    assert not evidence["label_wrong_class"]["acts"]
    assert evidence["label_wrong_class"]["precision"] < ctx.cfg.min_fix_precision
    assert evidence["box_badly_placed"]["acts"], evidence  # right about every box it moves
    assert evidence["box_badly_placed"]["recall"] >= 0.7  # 1 in 8 is seen as another class
    # dropped boxes are all found, but 1 in 8 would come back with the wrong class
    assert evidence["box_missing"]["recall"] >= 0.9
    assert abs(evidence["box_missing"]["precision"] - 7 / 8) < 0.1, evidence["box_missing"]
    assert core.apply_policy(ctx, findings)["train"] == core.apply_policy(ctx, [])["train"]


def test_the_datas_own_errors_are_credited_up_to_the_prior_and_then_fixed(tmp_path):
    """Colour data whose labels already hold 5% class swaps (its own errors, unknown to the
    stage): the probe's copy holds them too. Counting every change to an uninjected box as
    wrong would stop the rule; the two-pass estimate credits the changes the rule also makes
    on the data as given, up to recall x label_qa.max_own_error_rate, so it acts, and what it
    applies undoes the data's own swaps. With that prior at 0 the same run only reports."""
    ctx, injected = _shapes_ctx(tmp_path, noise={"class_swap": 0.05})
    original = {r["annotation_id"]: r["original"]["category_id"] for r in injected}
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", {})}
    findings = core.model_findings(ctx)
    evidence = ctx.fix_evidence["label_wrong_class"]
    assert evidence["acts"], evidence
    assert evidence["precision_conservative"] < ctx.cfg.min_fix_precision <= evidence["precision"]
    assert 0 < evidence["credited"] <= evidence["own_errors_found_at_most"], evidence
    applied = [f for f in findings if f.action == "fix"]
    assert len(applied) >= 0.8 * len(original), (len(applied), len(original))
    right = sum(f.fix["category_id"] == original.get(f.annotation_id) for f in applied)
    assert right >= 0.9 * len(applied), (right, len(applied))

    ctx, _ = _shapes_ctx(tmp_path / "no_prior", noise={"class_swap": 0.05})
    ctx.cfg = ctx.cfg.model_copy(update={"max_own_error_rate": 0.0})
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", {})}
    findings = core.model_findings(ctx)
    assert ctx.fix_evidence["label_wrong_class"]["credited"] == 0
    assert not ctx.fix_evidence["label_wrong_class"]["acts"]
    assert not [f for f in findings if f.action != "keep"]


def test_error_like_share_bounds_how_many_base_changes_look_like_injected_errors():
    from tasks.label_qa.probe import error_like_share

    injected = list(np.linspace(0.0, 0.2, 40))
    assert error_like_share(list(np.linspace(0.0, 0.2, 40)), injected) == 1.0  # same scores
    assert error_like_share(list(np.linspace(0.5, 0.9, 40)), injected) < 0.2  # unlike errors
    mixed = list(np.linspace(0.0, 0.2, 20)) + list(np.linspace(0.5, 0.9, 20))
    assert 0.4 < error_like_share(mixed, injected) < 0.9
    assert error_like_share([], injected) == 1.0
    assert error_like_share(injected, []) == 0.0  # no injected error changed: no credit


def _free_corner(boxes, w, h, side=6):
    """An xywh square of `side` px in an image corner that overlaps none of `boxes`."""
    for x, y in ((0, 0), (w - side, 0), (0, h - side), (w - side, h - side)):
        square = np.array([[x, y, side, side]], float)
        if not boxes or iou_matrix(square, np.array(boxes, float)).max() == 0:
            return [float(x), float(y), float(side), float(side)]
    return None


def _clutter_ctx(tmp_path, probability, every):
    """Clean colour shapes, a detector that sees every object (0.97) and, on 1 train image in
    `every`, also a background patch at `probability`: clutter read as an object. Returns the
    context with those predictions and the number of patches."""
    ctx, _ = _shapes_ctx(tmp_path, box_classifier=False)
    truth = _truth(ctx)
    preds = _oracle_predictions(ctx, "train", truth)
    patched = 0
    for n, image_id in enumerate(sorted(preds)):
        im = ctx.splits["train"].images[image_id]
        corner = _free_corner([b for _, b in truth.get(image_id, [])], im.width, im.height)
        if n % every or corner is None:
            continue
        x, y, w, h = corner
        row = np.array([[x, y, x + w, y + h, probability]], np.float32)
        preds[image_id][0] = np.concatenate([preds[image_id][0], row])
        patched += 1
    ctx.predictions = {"train": preds}
    return ctx, patched


@pytest.mark.parametrize("clutter_probability, acts", [(0.3, False), (0.97, True)])
def test_box_missing_credits_an_addition_only_when_it_scores_like_a_dropped_box(
    tmp_path, clutter_probability, acts
):
    """Each background patch is a base change of box_missing the probe cannot check box by
    box. Scored by the added box's probability, a weak patch (0.3) does not look like a dropped
    object (0.97) and is not credited, so the rule only reports; a patch seen as surely as a
    real object is credited within the prior (5%) and the rule acts. ObjectLab's overlooked
    score (~0 for both) could not tell them."""
    ctx, patched = _clutter_ctx(tmp_path, clutter_probability, every=10)
    findings = [f for f in core.model_findings(ctx) if f.rule == "box_missing"]
    evidence = ctx.fix_evidence["box_missing"]
    assert patched >= 15 and evidence["base"] == patched, (patched, evidence)
    assert evidence["recall"] >= 0.9 and evidence["right_on_injected"] == evidence["on_injected"]
    on_patches = [f.score for f in findings if f.split == "train"]
    assert len(on_patches) == patched
    assert all(abs(v - (1 - clutter_probability)) < 1e-3 for v in on_patches), on_patches
    assert evidence["acts"] is acts, evidence
    if acts:
        assert evidence["credited"] == patched
    else:
        assert evidence["error_like_share"] < 0.2 and evidence["credited"] <= 1, evidence
        assert not [f for f in findings if f.action != "keep"]
        cleaned = core.apply_policy(ctx, findings)["train"]["annotations"]
        assert not [a for a in cleaned if a.get("qa_added_by")]  # the patches stay unlabelled


def test_a_few_false_alarms_are_not_outvoted_by_the_copys_right_fixes(tmp_path):
    """Clean labels, and a detector that reads clutter as an object on 1 image in 40: a
    handful of base changes, every one wrong, beside dozens of right fixes of injected drops.
    Pooled, the copy's fixes vote the rule past the floor and it would add every patch; the
    precision that decides is that of the changes it would make on the split, so it reports."""
    ctx, patched = _clutter_ctx(tmp_path, 0.3, every=40)
    findings = [f for f in core.model_findings(ctx) if f.rule == "box_missing"]
    evidence = ctx.fix_evidence["box_missing"]
    assert 3 <= patched == evidence["base"] and evidence["on_injected"] >= 8 * patched, evidence
    assert evidence["precision_pooled"] >= ctx.cfg.min_fix_precision, evidence  # the old rule
    assert evidence["precision"] < 0.5 and not evidence["acts"], evidence
    assert f"on this split's {patched} changes" in evidence["reason"], evidence["reason"]
    assert not [f for f in findings if f.action != "keep"]
    cleaned = core.apply_policy(ctx, findings)["train"]["annotations"]
    assert not [a for a in cleaned if a.get("qa_added_by")]


def test_the_probe_copy_holds_pass_0s_changes_and_injects_only_elsewhere(tmp_path):
    """The copy is the split as the rule would leave it (relabel, move, drop and add applied),
    and the known errors go only into boxes pass 0 left alone."""
    from tasks.harness.config import LabelNoiseCfg
    from tasks.label_qa.probe import _base_changes, corrupted_copy, own_errors_at_most

    ctx, _ = _shapes_ctx(tmp_path, train_images=20)
    anns = ctx.interim["train"]["annotations"]
    a, b, c = anns[0], anns[1], anns[2]
    other = next(k.id for k in ctx.splits["train"].coco.categories if k.id != a["category_id"])
    moved = [b["bbox"][0] + 3, b["bbox"][1], b["bbox"][2], b["bbox"][3]]
    added = {"category_id": other, "bbox": [1.0, 1.0, 5.0, 5.0]}
    base = [
        core.Finding(
            "train", a["image_id"], a["id"], "r", "warning", 0.1, "", {"category_id": other}, "fix"
        ),
        core.Finding(
            "train", b["image_id"], b["id"], "r", "warning", 0.1, "", {"bbox": moved}, "fix"
        ),
        core.Finding("train", c["image_id"], None, "r", "warning", 0.1, "", {"add": added}, "fix"),
    ]
    copy, truth = corrupted_copy(ctx, LabelNoiseCfg(class_swap=0.3), 0, _base_changes("fix", base))
    by_id = {x["id"]: x for x in copy["annotations"]}
    assert by_id[a["id"]]["category_id"] == other and by_id[b["id"]]["bbox"] == moved
    assert [x for x in copy["annotations"] if x["bbox"] == added["bbox"]], "the add is applied"
    assert len(copy["annotations"]) == len(anns) + 1
    assert truth and not {r["annotation_id"] for r in truth} & {a["id"], b["id"]}
    assert anns[0]["category_id"] == a["category_id"]  # the split itself is untouched
    copy, _ = corrupted_copy(ctx, LabelNoiseCfg(), 0, _base_changes("drop", base[:1]))
    assert a["id"] not in {x["id"] for x in copy["annotations"]}  # policy drop: removed
    # the prior on the data's own errors is a rate: a split of 2500 boxes at 5% may hold 147
    assert own_errors_at_most(0.05, 2500) == pytest.approx(125 + 2 * np.sqrt(2500 * 0.0475))
    assert own_errors_at_most(0.0, 2500) == 0.0


@pytest.mark.slow
def test_decisions_round_trip_reject_keeps_the_label(tmp_path):
    """Two stage runs (~35 s): the policy clips a box; a reviewer rejects that; the label stays."""
    dataset = make_dataset(tmp_path / "d", [box_outside_3])
    first = run_stage(tmp_path, dataset, max_error_rate=0.5, decisions="decisions.yaml")
    assert first.returncode == 0, first.stderr
    qa = tmp_path / "qa"
    train = json.loads((qa / "manifest.json").read_text())["splits"]["train"]
    assert train["annotations"][2]["bbox"] == [25, 25, 7, 7]  # clipped by the policy
    template = yaml.safe_load((qa / "review/decisions.yaml").read_text())
    [entry] = template["decisions"]
    assert entry["annotation_id"] == 3 and entry["decision"] == "pending"
    reviewed = json.loads((qa / "review/train.json").read_text())
    assert reviewed["annotations"][2]["qa_findings"][0]["rule"] == "box_outside_image"
    (tmp_path / "decisions.yaml").write_text(
        yaml.safe_dump({"decisions": [{**entry, "decision": "reject"}]})
    )
    second = run_stage(tmp_path, dataset, max_error_rate=0.0, decisions="decisions.yaml")
    assert second.returncode == 0, second.stderr  # rejected: no longer an error for the gate
    train = json.loads((qa / "manifest.json").read_text())["splits"]["train"]
    assert train["annotations"][2]["bbox"] == [25, 25, 10, 10]  # the label stays
    [row] = json.loads((qa / "report.json").read_text())
    assert row["action"] == "keep" and row["note"].startswith("rejected in review")
    assert json.loads((qa / "metrics.json").read_text())["reviewed"] == {"accept": 0, "reject": 1}
    assert "1 rejected" in (qa / "report.md").read_text()


BAD_DECISIONS = [
    (
        [
            {
                "split": "train",
                "rule": "box_outside_image",
                "annotation_id": 99,
                "decision": "reject",
            }
        ],
        "decisions.yaml: decisions[0]: annotation 99 is not in train.json",
    ),
    (
        [{"split": "train", "rule": "no_such_rule", "annotation_id": 1, "decision": "reject"}],
        "decisions.yaml: decisions[0]: unknown rule 'no_such_rule'",
    ),
    (
        [{"split": "train", "rule": "box_outside_image", "annotation_id": 1, "decision": "maybe"}],
        "decisions.yaml: decisions[0].decision: Input should be 'accept', 'reject' or 'pending'",
    ),
    (
        [{"split": "train", "rule": "box_missing", "image_id": 1, "decision": "accept"}],
        "decisions.yaml: decisions[0]: a box_missing decision needs fix.add",
    ),
    ("decisions: [unclosed", "decisions.yaml: not valid YAML"),
]


@pytest.mark.parametrize(("decisions", "message"), BAD_DECISIONS)
def test_a_bad_decisions_file_is_a_clear_error(tmp_path, decisions, message):
    dataset = make_dataset(tmp_path / "d", [box_outside_3])
    path = tmp_path / "decisions.yaml"
    path.write_text(
        decisions if isinstance(decisions, str) else yaml.safe_dump({"decisions": decisions})
    )
    with pytest.raises(DataError) as e:
        label_qa.run(CFG, dataset=dataset, decisions=path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_the_stage_stops_on_a_bad_decisions_file_and_writes_nothing(tmp_path):
    dataset = make_dataset(tmp_path / "d", [box_outside_3])
    decisions, message = BAD_DECISIONS[0]
    (tmp_path / "decisions.yaml").write_text(yaml.safe_dump({"decisions": decisions}))
    proc = run_stage(tmp_path, dataset, max_error_rate=0.5, decisions="decisions.yaml")
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "qa" / "manifest.json").exists()


def test_only_a_missing_model_or_alias_means_no_champion(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.label_qa.__main__ import _no_champion

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    errors = []
    for create in (False, True):
        if create:
            client.create_registered_model("m")
        with pytest.raises(MlflowException) as e:
            client.get_model_version_by_alias("m", "champion")
        errors.append(e.value)
    assert all(_no_champion(e) for e in errors), [str(e) for e in errors]
    assert not _no_champion(MlflowException("database is locked", error_code="INTERNAL_ERROR"))


def test_a_registry_that_cannot_be_read_is_an_error_not_no_champion(tmp_path, monkeypatch):
    """A tracking URI with no server behind it, or one MLflow cannot use, fails label_qa with
    the URI named; it does not quietly score val/test with the cross-fit instead."""
    from tasks.harness.errors import ShrinkflowError
    from tasks.label_qa.__main__ import champion_runner
    from tests.conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for uri in (down, "foo://bar"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(ShrinkflowError, match=f"MLflow registry at {uri}: cannot read m@"):
            champion_runner("m", tmp_path)


@pytest.mark.slow
def test_two_stage_runs_on_clean_colour_data_are_identical_and_change_no_label(tmp_path):
    """The stage with a real cross-fit, twice, on clean coloured shapes (~1-2 min): byte-equal
    report.json and manifest (seeded folds and training, deterministic kernels, fixed
    threads), and the default policy changes no train label."""
    from tasks.datasets.shapes import ShapesCfg, generate
    from tests.conftest import tiny_params

    dataset = tmp_path / "shapes"
    shapes = {"width": 96, "height": 72, "object_size": (10, 20), "objects_per_image": (1, 3)}
    generate(ShapesCfg(train_images=120, val_images=8, test_images=8, **shapes), dataset)
    params = tiny_params()
    params["train"]["threads"] = 1
    params["label_qa"].update(min_class_count=1, max_error_rate=1.0)
    params["label_qa"]["model"] = {"folds": 2, "epochs": 6, "input_size": 64, "min_map50": 0.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    outs = []
    for run in ("a", "b"):
        cmd = [sys.executable, "-m", "tasks.label_qa", "--dataset", str(dataset), "--out", run]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(tmp_path / run)
    for name in ("report.json", "manifest.json", "review/decisions.yaml"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    metrics = json.loads((outs[0] / "metrics.json").read_text())
    assert metrics["fix_evidence"], metrics  # the model rules ran and were measured
    raw = json.loads((dataset / "train.json").read_text())["annotations"]
    kept = json.loads((outs[0] / "manifest.json").read_text())["splits"]["train"]["annotations"]
    assert [(a["id"], a["category_id"], a["bbox"]) for a in kept] == [
        (a["id"], a["category_id"], a["bbox"]) for a in raw
    ]


def test_accepted_decisions_apply_over_the_policy_and_without_a_finding(tmp_path):
    dataset = make_dataset(tmp_path / "d", [box_outside_3])
    decisions = [  # the policy keeps the box; the reviewer accepts its clip
        {"split": "train", "rule": "box_outside_image", "annotation_id": 3, "decision": "accept"},
        {  # a relabel no rule proposed this run (the model is off): applied from the entry
            "split": "train",
            "rule": "label_wrong_class",
            "annotation_id": 1,
            "decision": "accept",
            "fix": {"category_id": 2},
        },
        {"split": "val", "rule": "box_missing", "image_id": 2, "decision": "pending"},
    ]
    path = tmp_path / "decisions.yaml"
    path.write_text(yaml.safe_dump({"decisions": decisions}))
    cfg = CFG.model_copy(update={"policy": {"box_outside_image": "keep"}})
    result = label_qa.run(cfg, dataset=dataset, decisions=path)
    anns = {a["id"]: a for a in result.manifest["splits"]["train"]["annotations"]}
    assert anns[3]["bbox"] == [25, 25, 7, 7] and anns[3]["qa_fixed_by"] == ["box_outside_image"]
    assert anns[1]["category_id"] == 2 and anns[1]["qa_fixed_by"] == ["label_wrong_class"]
    assert result.metrics["reviewed"] == {"accept": 2, "reject": 0}
    assert label_qa.run(cfg, dataset=dataset).manifest["splits"]["train"]["annotations"][2][
        "bbox"
    ] == [25, 25, 10, 10]  # without the decisions the policy keeps it


def test_objectlab_scores_from_one_shared_matching_equal_cleanlabs_own():
    """model_checks computes cleanlab's label-to-prediction matching once and passes it to the
    three ObjectLab scores (`auxiliary_inputs`, through a private cleanlab helper): the scores
    must be the ones each function computes on its own, so a cleanlab change shows here."""
    from cleanlab.internal.constants import ALPHA
    from cleanlab.object_detection import rank

    rng = np.random.default_rng(0)
    labels, predictions = [], []
    for _ in range(40):
        n = int(rng.integers(0, 5))
        xy, wh = rng.uniform(0, 100, (n, 2)), rng.uniform(5, 30, (n, 2))
        labels.append({"bboxes": np.concatenate([xy, xy + wh], 1), "labels": rng.integers(0, 3, n)})
        per_class = []
        for _ in range(3):
            m = int(rng.integers(0, 3))
            pxy, pwh = rng.uniform(0, 100, (m, 2)), rng.uniform(5, 30, (m, 2))
            score = rng.uniform(0, 1, (m, 1))
            per_class.append(np.concatenate([pxy, pxy + pwh, score], 1).astype(np.float32))
        predictions.append(per_class)
    kw = {"labels": labels, "predictions": predictions}
    aux = rank._get_valid_inputs_for_compute_scores(ALPHA, labels, predictions)
    for score, extra in (
        (rank.compute_swap_box_scores, {"high_probability_threshold": 0.7}),
        (rank.compute_badloc_box_scores, {"low_probability_threshold": 0.04}),
        (rank.compute_overlooked_box_scores, {"high_probability_threshold": 0.08}),
    ):
        own = score(**kw, **extra)
        shared = score(**kw, **extra, auxiliary_inputs=aux)
        assert sum(len(s) for s in own) > 0
        for a, b in zip(own, shared, strict=True):
            np.testing.assert_array_equal(a, b)
