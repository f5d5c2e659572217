"""Label QA's Label Studio round trip (tasks/label_qa/label_studio.py): findings out as tasks
(current labels as annotations, proposed fixes as predictions, percent boxes, finding ids in
meta), a reviewer's export back in as decisions, and a clear error for a malformed export."""

import copy
import json
import os
from pathlib import Path

import pytest

from tasks import label_qa
from tasks.harness.errors import DataError
from tasks.label_qa import core, review
from tests.test_label_qa import CFG, _oracle_predictions, make_dataset


def _corrupt(root, coco):
    coco["annotations"][0]["category_id"] = 2  # image 1: the object is class 1 ('a')
    coco["annotations"][1]["bbox"] = [12, 12, 10, 12]  # image 2: the object is at 4, 4


def _findings(tmp_path):
    """Train of 4 images, 32x32: a swapped class (image 1), a shifted box (image 2) and an
    unlabelled object (image 4), found by the model rules on a detector that sees the truth."""
    root = make_dataset(tmp_path / "d", [_corrupt])
    truth = {i: [(2 - i % 2, [4, 4, 10, 12])] for i in range(1, 5)}
    truth[4].append((1, [18, 18, 10, 10]))
    cfg = CFG.model_copy(update={"model": CFG.model.model_copy(update={"enabled": True})})
    ctx = core.QaContext(cfg, root, {s: core.load_split(root, s) for s in label_qa.SPLITS})
    ctx.interim = core.apply_policy(ctx, [])
    ctx.predictions = {"train": _oracle_predictions(ctx, "train", truth)}
    return root, ctx, core.run_rules(ctx, phase=2)


def _export(tmp_path):
    root, ctx, findings = _findings(tmp_path)
    review.export(findings, ctx, tmp_path / "review")
    tasks = json.loads((tmp_path / "review" / "label_studio.json").read_text())
    return root, ctx, findings, {t["meta"]["image_id"]: t for t in tasks}


def _region(task, rid, where="annotations"):
    return next(r for r in task[where][0]["result"] if r["id"] == rid)


def test_findings_export_as_label_studio_tasks(tmp_path):
    _, _, findings, tasks = _export(tmp_path)
    assert sorted(tasks) == [1, 2, 4]
    one = tasks[1]
    assert one["data"]["image"] == "/data/local-files/?d=train/1.png"
    assert [f["id"] for f in one["meta"]["findings"]] == ["train/label_wrong_class/annotation/1"]
    current = _region(one, "a1")
    assert current["type"] == "rectanglelabels" and current["from_name"] == "label"
    assert (current["original_width"], current["original_height"]) == (32, 32)
    assert current["value"] == {  # [4, 4, 10, 12] px of 32 x 32, in percent
        "x": 12.5,
        "y": 12.5,
        "width": 31.25,
        "height": 37.5,
        "rotation": 0,
        "rectanglelabels": ["b"],
    }
    assert _region(one, "a1", "predictions")["value"]["rectanglelabels"] == ["a"]
    assert one["predictions"][0]["model_version"] == "shrinkflow label_qa"
    moved = _region(tasks[2], "a2", "predictions")["value"]
    assert (moved["x"], moved["y"]) == (12.5, 12.5)  # the model's box at 4, 4
    assert _region(tasks[2], "a2")["value"]["x"] == 37.5  # the label as it is, at 12
    [added] = [r for r in tasks[4]["predictions"][0]["result"] if r["id"].startswith("p")]
    assert added["value"]["rectanglelabels"] == ["a"] and added["value"]["x"] == 56.25
    assert [r["id"] for r in tasks[4]["annotations"][0]["result"]] == ["a4"]
    xml = (tmp_path / "review" / "label_studio.xml").read_text()
    assert '<RectangleLabels name="label" toName="image">' in xml and '"a"' in xml
    assert len(tasks) == len({(f.split, f.image_id) for f in findings})


def _reviewed(tasks):
    """What Label Studio exports after a review: image 1's relabel accepted (the prediction
    copied into the annotation), image 2's move rejected (the annotation left as it was),
    image 4's added box accepted and nudged by the reviewer; image 3 skipped."""
    out = []
    for image_id, task in sorted(tasks.items()):
        task = copy.deepcopy(task)
        ann = task["annotations"][0]
        if image_id == 1:
            ann["result"] = copy.deepcopy(task["predictions"][0]["result"])
        if image_id == 4:
            ann["result"] = copy.deepcopy(task["predictions"][0]["result"])
            ann["result"][-1]["value"]["x"] += 100 / 32  # one pixel right
        ann |= {"id": 10 + image_id, "completed_by": 1, "was_cancelled": False, "lead_time": 3.2}
        out.append({"id": image_id, "project": 7, **task, "predictions": [99]})
    skipped = copy.deepcopy(tasks[1])
    skipped["annotations"][0]["was_cancelled"] = True
    return [*out, skipped]


def test_a_label_studio_export_round_trips_into_decisions_and_the_manifest(tmp_path):
    root, ctx, findings, tasks = _export(tmp_path)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(_reviewed(tasks)))
    decisions = review.load_decisions(path, ctx)
    got = {(d.rule, d.annotation_id, d.image_id): d for d in decisions}
    assert set(got) == {
        ("label_wrong_class", 1, None),
        ("box_badly_placed", 2, None),
        ("box_missing", None, 4),
    }  # the skipped task adds nothing
    assert got[("label_wrong_class", 1, None)].decision == "accept"
    assert got[("label_wrong_class", 1, None)].fix.category_id == 1
    assert got[("box_badly_placed", 2, None)].decision == "reject"
    added = got[("box_missing", None, 4)]
    assert added.decision == "accept" and added.fix.add.bbox == [19.0, 18.0, 10.0, 10.0]
    applied = review.apply_decisions(findings, decisions, ctx, path)
    train = {a["id"]: a for a in core.apply_policy(ctx, applied)["train"]["annotations"]}
    assert train[1]["category_id"] == 1
    assert train[2]["bbox"] == [12, 12, 10, 12]  # rejected: the label stays where it was
    assert [a["bbox"] for a in train.values() if a.get("qa_added_by")] == [[19.0, 18.0, 10.0, 10.0]]
    # the stage reads the export as label_qa.decisions, the model rules off: decisions apply
    result = label_qa.run(CFG, dataset=root, decisions=path)
    kept = result.manifest["splits"]["train"]["annotations"]
    assert {a["id"]: a["category_id"] for a in kept}[1] == 1
    assert [a["bbox"] for a in kept if a.get("qa_added_by")] == [[19.0, 18.0, 10.0, 10.0]]
    assert result.metrics["reviewed"] == {"accept": 2, "reject": 0}  # no finding to reject


def _break(tasks, how):
    bad = _reviewed(tasks)
    how(bad)
    return bad


BAD_EXPORTS = [
    (lambda t: t.clear() or t.append({"meta": {}}), "[0].meta.split: Field required"),
    (lambda t: t[0].pop("meta"), "[0].meta: Field required"),
    (
        lambda t: t[0]["annotations"][0]["result"][0]["value"]["rectanglelabels"].__setitem__(
            0, "zebra"
        ),
        "[0].annotations[0]: region 0 is labelled 'zebra', not a category of train.json",
    ),
    (
        lambda t: t[0]["annotations"][0]["result"][0]["value"].__setitem__("width", -3),
        "[0].annotations[0].result[0].value.width: Input should be greater than or equal to 0",
    ),
    (
        lambda t: t[0]["meta"]["findings"][0].__setitem__("annotation_id", 99),
        "[0].meta.findings[0]: annotation 99 is not in train.json",
    ),
    (lambda t: t[0]["meta"].__setitem__("image_id", 77), "[0].meta.image_id: image 77 is not"),
]


@pytest.mark.parametrize(("how", "message"), BAD_EXPORTS)
def test_a_malformed_label_studio_export_is_a_clear_error_naming_the_entry(tmp_path, how, message):
    _, ctx, _, tasks = _export(tmp_path)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(_break(tasks, how)))
    with pytest.raises(DataError) as e:
        review.load_decisions(path, ctx)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_an_export_that_is_not_a_task_list_is_a_clear_error(tmp_path):
    _, ctx, _, _ = _export(tmp_path)
    path = tmp_path / "export.json"
    for text, message in (("{}", "expected a Label Studio JSON export"), ("[", "not valid JSON")):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            review.load_decisions(path, ctx)


def test_structural_findings_export_and_an_orphan_annotation_is_left_out(tmp_path):
    """Phase-1 findings (a clipped box, an annotation of an image that does not exist) from a
    stage run: the clip becomes a task with its clipped box proposed, the orphan has no image
    to show and is left out; the dataset root may be given as a relative path."""
    from tests.test_label_qa import box_outside_3, orphan_annotation

    root = make_dataset(tmp_path / "d", [box_outside_3, orphan_annotation])
    result = label_qa.run(CFG, dataset=Path(os.path.relpath(root)))
    assert {(f.rule, f.image_id) for f in result.findings} == {
        ("box_outside_image", 3),
        ("unknown_image", 1234),
    }
    review.export(result.findings, result.ctx, tmp_path / "review")
    [task] = json.loads((tmp_path / "review" / "label_studio.json").read_text())
    assert task["meta"]["image_id"] == 3
    assert task["meta"]["findings"][0]["rule"] == "box_outside_image"
    clipped = _region(task, "a3", "predictions")["value"]
    assert (clipped["width"], clipped["height"]) == (100 * 7 / 32, 100 * 7 / 32)
