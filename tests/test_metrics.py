import numpy as np
import pytest

from tasks.metrics.detection import coco_map, coco_metrics

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_map_equals_pycocotools_map(seed):
    """coco_map (faster-coco-eval) ranks models in the training and quantization loops; it must
    give pycocotools' figures: 60 non-square images with 0-6 boxes of 4 classes (one class
    never labelled, some images empty, small to large boxes), jittered detections with
    duplicates, wrong classes and misses."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, 61):
        w, h = int(rng.integers(80, 400)), int(rng.integers(60, 300))
        images.append({"id": i, "width": w, "height": h})
        for _ in range(int(rng.integers(0, 7))):
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            cat = int(rng.integers(1, 4))
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box, "iscrowd": 0}
            )
            for _ in range(int(rng.integers(0, 3))):  # 0 (a miss) to 2 (a duplicate) detections
                jitter = [v + float(rng.normal(0, 0.15 * max(bw, bh))) for v in box[:2]] + box[2:]
                wrong = rng.random() < 0.1
                dets.append(det(i, int(rng.integers(1, 5)) if wrong else cat, jitter, rng.random()))
    gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in (1, 2, 3, 4)]}
    fast = coco_map(gt, [dict(d) for d in dets])
    full = coco_metrics(gt, [dict(d) for d in dets], score_threshold=0.3)
    assert 0.05 < fast["map50"] < 0.95  # neither trivial nor perfect
    assert fast["map50"] == pytest.approx(full["map50"], abs=1e-12)
    assert fast["map50_95"] == pytest.approx(full["map50_95"], abs=1e-12)
    assert coco_map(gt, []) == {"map50": 0.0, "map50_95": 0.0}


def test_p99_is_reported_only_from_200_timed_calls():
    """From 60 calls the 99th percentile is about the slowest one (a stall): not reported."""
    from tasks.metrics.timing import P99_MIN_RUNS, latency_stats

    rng = np.random.default_rng(0)
    seconds = rng.uniform(1e-3, 2e-3, 300)
    seconds[7] = 0.5  # one 500 ms stall
    few = latency_stats(seconds[:60], 1)
    assert "latency_ms_p99" not in few and few["latency_runs"] == 60
    assert few["latency_ms_p50"] == pytest.approx(np.median(seconds[:60]) * 1e3)
    assert few["throughput_ips"] == pytest.approx(1 / np.median(seconds[:60]))
    assert "latency_ms_p99" not in latency_stats(seconds[: P99_MIN_RUNS - 1], 1)
    assert "latency_ms_p99" in latency_stats(seconds[:P99_MIN_RUNS], 1)
    many = latency_stats(seconds, 1)
    assert many["latency_ms_p99"] == pytest.approx(np.percentile(seconds * 1e3, 99))
    assert many["latency_ms_p99"] < 2.1  # the stall is one call in 300: not the p99


def test_ours_against_a_peer_names_noise_as_noise():
    """variants' `versus`: the paired interval over test images decides the verdict. 120 images,
    one box each: a model that misses 1 box is `equal within noise` of a perfect one; one that
    misses 40 is `worse`; the perfect one against the one missing 40 is `better`."""
    from tasks.harness.config import VariantsCfg
    from tasks.metrics.bootstrap import match_table
    from tasks.variants import versus

    n = 120
    gt = {
        "images": [{"id": i, "width": 64, "height": 48} for i in range(n)],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i,
                "category_id": 1 + i % 2,
                "bbox": [8, 6, 20, 16],
                "area": 320,
                "iscrowd": 0,
            }
            for i in range(n)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    cfg = VariantsCfg(resamples=500)
    fast, slow = {"latency_ms_p50": 1.0}, {"latency_ms_p50": 2.0}

    def vs(ours, peer, mine, theirs):
        return versus(match_table(gt, ours), match_table(gt, peer), n, mine, theirs, cfg)

    near = vs(perfect[1:], perfect, fast, slow)
    assert near["verdict"] == "equal within noise", near
    assert near["ci_low"] < near["map50_diff"] < 0 <= near["ci_high"]
    assert near["speedup"] == 2.0
    worse = vs(perfect[40:], perfect, slow, fast)
    assert worse["verdict"] == "worse" and worse["ci_high"] < 0 and worse["speedup"] == 0.5
    assert vs(perfect, perfect[40:], fast, fast)["verdict"] == "better"
