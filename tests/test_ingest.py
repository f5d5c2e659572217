"""`ingest`: COCO, YOLO and VOC copies of one dataset give one manifest and one set of label-QA
findings; every bad input is a one-line error naming the file and the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from tasks import ingest, label_qa
from tasks.harness.config import DataCfg, DatasetCfg, LabelQaCfg, SplitCfg
from tasks.harness.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["square", "bar", "dot"]
W, H = 80, 48  # non-square on purpose
QA = LabelQaCfg(min_class_count=1, model={"enabled": False})


def scenes(seed: int = 0) -> dict[str, list[dict]]:
    """Per split: images {name, pixels, boxes [(class index, x, y, w, h)]} with integer boxes.
    Defects label QA must find in every format: a duplicate box, an extreme aspect, a box leaving
    the image, an image with no box."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in (("train", 6), ("val", 3), ("test", 3)):
        rows = []
        for i in range(n):
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            boxes = [
                (int(rng.integers(3)), int(rng.integers(0, 50)), int(rng.integers(0, 20)), 12, 10)
                for _ in range(int(rng.integers(1, 4)))
            ]
            rows.append({"name": f"{s}_{i:02d}", "pixels": pixels, "boxes": boxes})
        out[s] = rows
    train = out["train"]
    train[1]["boxes"].append(train[1]["boxes"][0])  # duplicate_box
    train[2]["boxes"].append((1, 2, 40, 40, 3))  # box_extreme_aspect
    train[3]["boxes"].append((0, 70, 5, 20, 10))  # box_outside_image (fix: clip)
    out["val"][0]["boxes"] = []  # image_without_annotations
    return out


def write_coco(ds: dict, root: Path) -> Path:
    for s, rows in ds.items():
        (root / "images" / s).mkdir(parents=True)
        coco = {"images": [], "annotations": [], "categories": []}
        coco["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
        for i, r in enumerate(rows, 1):
            name = f"images/{s}/{r['name']}.png"
            Image.fromarray(r["pixels"]).save(root / name)
            coco["images"].append({"id": i, "file_name": name, "width": W, "height": H})
            for c, x, y, w, h in r["boxes"]:
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": i,
                        "category_id": c + 1,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        (root / f"{s}.json").write_text(json.dumps(coco))
    return root


def write_yolo(ds: dict, root: Path) -> Path:
    for s, rows in ds.items():
        (root / "images" / s).mkdir(parents=True)
        (root / "labels" / s).mkdir(parents=True)
        for r in rows:
            Image.fromarray(r["pixels"]).save(root / "images" / s / f"{r['name']}.png")
            if not r["boxes"]:
                continue  # no label file: a negative
            lines = [
                f"{c} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}"
                for c, x, y, w, h in r["boxes"]
            ]
            (root / "labels" / s / f"{r['name']}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": ".", **{s: f"images/{s}" for s in ds}, "names": dict(enumerate(CLASSES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


def voc_xml(name: str, boxes, size=(W, H), difficult=()) -> str:
    objs = "".join(
        f"<object><name>{CLASSES[c] if isinstance(c, int) else c}</name>"
        f"<difficult>{int(k in difficult)}</difficult><bndbox><xmin>{x + 1}</xmin>"
        f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
        for k, (c, x, y, w, h) in enumerate(boxes)
    )
    return (
        f"<annotation><filename>{name}.png</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def write_voc(ds: dict, root: Path) -> Path:
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for s, rows in ds.items():
        for r in rows:
            Image.fromarray(r["pixels"]).save(root / "JPEGImages" / f"{r['name']}.png")
            (root / "Annotations" / f"{r['name']}.xml").write_text(voc_xml(r["name"], r["boxes"]))
        (root / "ImageSets/Main" / f"{s}.txt").write_text("".join(f"{r['name']}\n" for r in rows))
    return root


WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc}


def ingest_as(fmt: str, root: Path, out: Path, **cfg) -> tuple[dict, dict]:
    dcfg = DatasetCfg(
        format=fmt, path=str(root), **({"classes": CLASSES} if fmt == "voc" else {}), **cfg
    )
    metrics = ingest.run(dcfg, DataCfg(), near_duplicate_bits=24, out_dir=out)
    return json.loads((out / "manifest.json").read_text()), metrics


def canonical(manifest: dict) -> dict:
    """The manifest up to ids and file locations: per split, per image stem, its size and boxes."""
    out = {}
    for s, coco in manifest["splits"].items():
        names = {c["id"]: c["name"] for c in coco["categories"]}
        anns: dict[int, list] = {}
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(
                (names[a["category_id"]], [round(v, 2) for v in a["bbox"]], a["iscrowd"])
            )
        out[s] = {
            Path(im["file_name"]).stem: (
                im["width"],
                im["height"],
                im["md5"],
                sorted(anns.get(im["id"], [])),
            )
            for im in coco["images"]
        }
    return out


def findings_key(manifest_path: Path) -> list:
    findings, _, _ = label_qa.run(QA, dataset=manifest_path)
    m = json.loads(manifest_path.read_text())
    stem = {
        (s, im["id"]): Path(im["file_name"]).stem
        for s, c in m["splits"].items()
        for im in c["images"]
    }
    box = {(s, a["id"]): a["bbox"] for s, c in m["splits"].items() for a in c["annotations"]}
    return sorted(
        (
            f.split,
            stem.get((f.split, f.image_id), ""),
            f.rule,
            str(box.get((f.split, f.annotation_id))),
            f.action,
        )
        for f in findings
    )


def test_coco_yolo_and_voc_copies_give_one_manifest_and_one_set_of_findings(tmp_path):
    ds = scenes()
    manifests, findings = {}, {}
    for fmt, write in WRITERS.items():
        root = write(ds, tmp_path / fmt)
        manifest, metrics = ingest_as(fmt, root, tmp_path / f"out-{fmt}")
        assert metrics["format"] == fmt and metrics["train"]["images"] == 6
        assert len(metrics["content_md5"]) == 32 and metrics["files"] >= 12
        manifests[fmt] = canonical(manifest)
        findings[fmt] = findings_key(tmp_path / f"out-{fmt}" / "manifest.json")
    assert manifests["yolo"] == manifests["coco"]
    assert manifests["voc"] == manifests["coco"]
    rules = {f[2] for f in findings["coco"]}
    assert {"duplicate_box", "box_extreme_aspect", "box_outside_image"} <= rules
    assert "image_without_annotations" in rules
    assert findings["yolo"] == findings["coco"] and findings["voc"] == findings["coco"]
    # the user's folder is read, never written
    assert not list((tmp_path / "yolo").rglob("*.json"))


def test_builtin_source_composes_the_digits_under_the_stage_outputs(tmp_path):
    cfg = DataCfg(train_images=4, val_images=2, test_images=2, canvas_size=64, digit_size=(12, 24))
    metrics = ingest.run(DatasetCfg(), cfg, near_duplicate_bits=24, out_dir=tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert metrics["format"] == "builtin" and m["root"] == str(tmp_path / "builtin")
    assert metrics["builtin"] == "digits"
    assert [len(m["splits"][s]["images"]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert (tmp_path / "builtin" / m["splits"]["train"]["images"][0]["file_name"]).is_file()
    assert [c["name"] for c in m["categories"]] == [str(d) for d in range(10)]


def test_builtin_shapes_are_a_params_change_and_give_the_colour_categories(tmp_path):
    """`data.kind: shapes` composes the coloured shapes (class = colour, non-square canvases)
    instead of the digits; the digit knobs are not read."""
    from tasks.datasets.shapes import PALETTE
    from tasks.harness.config import SHAPE_COLOURS, Params

    assert tuple(PALETTE) == SHAPE_COLOURS  # every colour the params accept has its RGB
    params = Params.model_validate(
        {
            "data": {
                "kind": "shapes",
                "shapes": {
                    "train_images": 4, "val_images": 2, "test_images": 2,
                    "width": 96, "height": 64, "classes": ["orange", "cyan", "red"],
                    "noise": {"class_swap": 0.25},
                },
            }
        }
    )  # fmt: skip
    metrics = ingest.run(params.dataset, params.data, near_duplicate_bits=24, out_dir=tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert metrics["format"] == "builtin" and metrics["builtin"] == "shapes"
    assert [c["name"] for c in m["categories"]] == ["orange", "cyan", "red"]
    assert {c["supercategory"] for c in m["categories"]} == {"colour"}
    assert [len(m["splits"][s]["images"]) for s in ("train", "val", "test")] == [4, 2, 2]
    first = m["splits"]["train"]["images"][0]
    assert (first["width"], first["height"]) == (96, 64)
    with Image.open(tmp_path / "builtin" / first["file_name"]) as im:
        assert im.size == (96, 64)
    assert metrics["noise"]["class_swap"] == round(0.25 * metrics["train"]["annotations"])
    assert (tmp_path / "builtin" / "noise.json").is_file()  # label QA's measurement reads it
    with pytest.raises(ValidationError, match="unknown colour 'purple'"):
        Params.model_validate({"data": {"shapes": {"classes": ["red", "purple"]}}})


def test_one_coco_file_is_split_with_near_duplicates_kept_together(tmp_path):
    ds = scenes()
    rows = [r for s in ds.values() for r in s]
    root = write_coco({"train": rows}, tmp_path / "one")
    (root / "train.json").rename(root / "all.json")
    # a re-encoded copy of the first image: it must land in the split of its original
    copy = root / "images/train/copy.jpg"
    Image.fromarray(rows[0]["pixels"]).save(copy, quality=90)
    coco = json.loads((root / "all.json").read_text())
    coco["images"].append({"id": 99, "file_name": "images/train/copy.jpg", "width": W, "height": H})
    (root / "all.json").write_text(json.dumps(coco))
    split = SplitCfg(val=0.25, test=0.25, seed=3)
    manifest, metrics = ingest_as(
        "coco", root, tmp_path / "out", annotations="all.json", split=split
    )
    where = {
        Path(im["file_name"]).stem: s for s, c in manifest["splits"].items() for im in c["images"]
    }
    assert len(where) == 13 and where["copy"] == where[rows[0]["name"]]
    assert metrics["test"]["images"] >= 3 and metrics["val"]["images"] >= 3
    again, _ = ingest_as("coco", root, tmp_path / "out2", annotations="all.json", split=split)
    assert again["splits"] == manifest["splits"]  # seeded
    findings, _, _ = label_qa.run(QA, dataset=tmp_path / "out" / "manifest.json")
    assert not [f for f in findings if f.rule == "split_leakage"]


def test_voc_difficult_objects_become_crowd_ignores(tmp_path):
    ds = {s: r[:1] for s, r in scenes().items()}
    root = write_voc(ds, tmp_path / "voc")
    name = ds["train"][0]["name"]
    boxes = ds["train"][0]["boxes"]
    (root / "Annotations" / f"{name}.xml").write_text(voc_xml(name, boxes, difficult=(0,)))
    manifest, _ = ingest_as("voc", root, tmp_path / "out")
    anns = manifest["splits"]["train"]["annotations"]
    assert [a["iscrowd"] for a in anns] == [1] + [0] * (len(anns) - 1)
    assert anns[0]["difficult"] == 1


def test_yolo_image_without_label_file_is_a_counted_negative(tmp_path):
    root = write_yolo(scenes(), tmp_path / "y")
    manifest, metrics = ingest_as("yolo", root, tmp_path / "out")
    assert metrics["images_without_label_file"] == 1 and metrics["val"]["negatives"] == 1
    assert len(manifest["splits"]["val"]["images"]) == 3


def test_yolo_coordinates_outside_the_image_are_a_label_qa_finding_not_an_error(tmp_path):
    ds = scenes()
    root = write_yolo(ds, tmp_path / "y")
    label = root / "labels/train" / f"{ds['train'][0]['name']}.txt"
    label.write_text(label.read_text() + "0 1.05 0.5 0.2 0.2\n")
    ingest_as("yolo", root, tmp_path / "out")
    findings, _, _ = label_qa.run(QA, dataset=tmp_path / "out" / "manifest.json")
    outside = [f for f in findings if f.rule == "box_outside_image" and f.split == "train"]
    assert len(outside) == 2 and all(f.action == "fix" for f in outside)


def _yolo_label(root: Path) -> Path:
    return sorted((root / "labels/train").glob("*.txt"))[0]


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


BAD = {
    "yolo 4 numbers": (
        "yolo",
        lambda r: _append(_yolo_label(r), "0 0.5 0.5 0.1\n"),
        r"labels/train/train_00\.txt: line \d: expected 5 numbers .* found 4",
    ),
    "yolo 6 numbers": (
        "yolo",
        lambda r: _append(_yolo_label(r), "0 0.5 0.5 0.1 0.1 0.3\n"),
        r"train_00\.txt: line \d: expected 5 numbers .* found 6",
    ),
    "yolo class id": (
        "yolo",
        lambda r: _append(_yolo_label(r), "3 0.5 0.5 0.1 0.1\n"),
        r"train_00\.txt: line \d: class 3: not a class id of data.yaml names \(0\.\.2\)",
    ),
    "yolo label without image": (
        "yolo",
        lambda r: (r / "labels/train/ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n"),
        r"labels/train/ghost\.txt: label file: no image",
    ),
    "yolo no names": (
        "yolo",
        lambda r: (r / "data.yaml").write_text("train: images/train\nval: images/val\n"),
        r"data\.yaml: names: missing",
    ),
    "voc bad xml": (
        "voc",
        lambda r: (r / "Annotations/train_01.xml").write_text("<annotation><size>"),
        r"Annotations/train_01\.xml: not valid XML",
    ),
    "voc size": (
        "voc",
        lambda r: (r / "Annotations/train_01.xml").write_text(voc_xml("train_01", [], (W, W))),
        rf"Annotations/train_01\.xml: size: {W}x{W} but JPEGImages/train_01\.png is {W}x{H}",
    ),
    "voc class": (
        "voc",
        lambda r: (r / "Annotations/train_01.xml").write_text(
            voc_xml("train_01", [(0, 1, 1, 5, 5), ("dgo", 1, 1, 5, 5)])
        ),
        r"Annotations/train_01\.xml: object\[1\]\.name: unknown class 'dgo'",
    ),
    "voc without lists": (
        "voc",
        lambda r: (r / "ImageSets/Main/test.txt").unlink(),
        r"ImageSets/Main: expected train\.txt, val\.txt and test\.txt \(found: train\.txt, val",
    ),
    "coco missing split": (
        "coco",
        lambda r: (r / "val.json").unlink(),
        r"dataset.format coco: val\.json missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_an_error_naming_the_file_and_field(tmp_path, case):
    fmt, corrupt, message = BAD[case]
    root = WRITERS[fmt](scenes(), tmp_path / "d")
    corrupt(root)
    with pytest.raises(DataError, match=message):
        ingest_as(fmt, root, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(("fmt", "written"), [("yolo", "voc"), ("voc", "coco"), ("coco", "yolo")])
def test_format_and_folder_disagree(tmp_path, fmt, written):
    root = WRITERS[written](scenes(), tmp_path / "d")
    with pytest.raises(
        DataError, match=rf"dataset.format is {fmt}, which expects .*; it looks like {written}"
    ):
        ingest_as(fmt, root, tmp_path / "out")


def test_split_rule_is_required_for_a_pool_and_refused_for_a_split_dataset(tmp_path):
    root = write_coco(scenes(), tmp_path / "d")
    with pytest.raises(ConfigError, match="dataset.split: .* has its own train/val/test"):
        ingest_as("coco", root, tmp_path / "out", split=SplitCfg())
    (root / "train.json").rename(root / "all.json")
    with pytest.raises(ConfigError, match="dataset.split: required"):
        ingest_as("coco", root, tmp_path / "out", annotations="all.json")


def test_stage_exits_with_one_line_and_writes_nothing(tmp_path):
    root = write_voc(scenes(), tmp_path / "voc")
    (root / "Annotations/val_00.xml").write_text("not xml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dataset"] = {"format": "voc", "path": "voc", "classes": CLASSES}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.ingest", "--out", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: voc/Annotations/val_00.xml: not valid XML: syntax error: line 1, column 0"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
