import pytest

from tasks.metrics.detection import coco_metrics

GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 30, 30], "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_perfect_detections_score_one():
    dets = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in GT["annotations"]]
    m = coco_metrics(GT, dets, score_threshold=0.5)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map50_95"] == pytest.approx(1.0)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert len(m["pr_curve"]) == 101


def test_precision_recall_at_operating_threshold():
    dets = [
        det(1, 1, [10, 10, 20, 20], 0.9),  # TP
        det(1, 2, [0, 0, 10, 10], 0.8),  # FP (wrong place)
        det(2, 1, [30, 30, 30, 30], 0.2),  # TP but below the threshold
    ]
    m = coco_metrics(GT, dets, score_threshold=0.5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 3)
    assert 0 < m["map50"] < 1


def test_no_detections_score_zero():
    m = coco_metrics(GT, [], score_threshold=0.5)
    assert m["map50"] == 0 and m["recall"] == 0
