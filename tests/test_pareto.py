"""The Pareto front of latency (minimise) vs mAP (maximise), checked as a property on random
point sets (ties included) and on the sweep's best-recipe rule."""

import random

import pytest

from flows.sweep import best_recipe, recipes
from tasks.metrics.pareto import dominates, pareto_front


def random_points(rng: random.Random, n: int) -> list[dict]:
    # coarse values so that ties on one or both axes happen often
    return [
        {"id": i, "latency_ms_p50": rng.randint(1, 12) / 4, "map50": rng.randint(0, 20) / 20}
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(40))
def test_front_is_exactly_the_non_dominated_points(seed):
    rng = random.Random(seed)
    points = random_points(rng, rng.randint(1, 30))
    front = pareto_front(points)
    ids = {p["id"] for p in front}
    x, y = "latency_ms_p50", "map50"
    for p in front:  # nothing dominates a front point
        assert not any(dominates(q, p, x, y) for q in points)
    for p in points:  # every other point is dominated by a point on the front
        if p["id"] not in ids:
            assert any(dominates(q, p, x, y) for q in front)
    assert [p[x] for p in front] == sorted(p[x] for p in front)


def test_front_keeps_exact_ties_and_drops_what_is_dominated():
    pts = [
        {"id": "a", "latency_ms_p50": 1.0, "map50": 0.5},
        {"id": "b", "latency_ms_p50": 1.0, "map50": 0.5},  # tie with a: both stay
        {"id": "c", "latency_ms_p50": 1.0, "map50": 0.4},  # as fast as a, less accurate
        {"id": "d", "latency_ms_p50": 2.0, "map50": 0.5},  # slower than a, as accurate
        {"id": "e", "latency_ms_p50": 3.0, "map50": 0.9},
    ]
    assert [p["id"] for p in pareto_front(pts)] == ["a", "b", "e"]


def test_the_grid_expands_to_every_combination_and_the_best_recipe_respects_the_gate():
    grid = {"prune.macs_reduction": [0.3, 0.5], "quantize.calibrator": ["minmax", "entropy"]}
    combos = recipes(grid)
    assert len(combos) == 4 and len({tuple(c.items()) for c in combos}) == 4
    rows = [
        {"experiment": "fast-bad", "status": "ok", "latency_ms_p50": 1.0, "delta_map50": -0.05},
        {"experiment": "ok", "status": "ok", "latency_ms_p50": 2.0, "delta_map50": -0.005},
        {"experiment": "slow", "status": "ok", "latency_ms_p50": 3.0, "delta_map50": 0.0},
        {"experiment": "broken", "status": "failed: no KPIs"},
    ]
    assert best_recipe(rows, 0.01)["experiment"] == "ok"
    assert best_recipe(rows, 0.1)["experiment"] == "fast-bad"
    assert best_recipe(rows[2:], 0.0)["experiment"] == "slow"
    assert best_recipe(rows[3:], 0.01) is None
