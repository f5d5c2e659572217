"""Promotion gates, registered by kind: each takes its typed config (tasks/harness/config/) and the
evidence about the candidate and returns a verdict with its figures and a reason.

    absolute        the candidate's KPI against a fixed bound           map50 >= 0.9
    relative        candidate - FP32 baseline, in points                 delta_map50 >= -1.5 pt
    per_class       no class loses more than N points of AP@0.5 vs FP32
    non_regression  paired bootstrap vs the current champion on the same test split

Adding a kind is a config class in tasks/harness/config/ and a function here under
`@gate("<kind>")`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from tasks.harness.config import gate_name
from tasks.harness.errors import ConfigError
from tasks.metrics.bootstrap import paired_bootstrap
from tasks.metrics.timing import P99_MIN_RUNS

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
POINTS = 100.0  # 1 point = 0.01 mAP


@dataclass
class Champion:
    """The current champion's and the candidate's detections on the same test split."""

    version: str
    gt: dict  # COCO dict of the test split
    challenger_rows: list[dict]
    champion_rows: list[dict]


@dataclass
class Evidence:
    metrics: dict  # evaluate/<target>/metrics.json
    champion: Champion | None = None  # None: no champion yet


@dataclass
class Verdict:
    name: str
    kind: str
    passed: bool
    reason: str
    figures: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "passed": self.passed, "reason": self.reason, **self.figures}


GATES: dict[str, Callable[..., Verdict]] = {}


def gate(kind: str):
    def register(fn: Callable[..., Verdict]) -> Callable[..., Verdict]:
        GATES[kind] = fn
        return fn

    return register


def evaluate_gates(gates: list, evidence: Evidence) -> list[Verdict]:
    """Every configured gate's verdict, in the order of params.yaml."""
    return [GATES[g.kind](g, evidence, gate_name(g)) for g in gates]


@gate("absolute")
def absolute(cfg, ev: Evidence, name: str) -> Verdict:
    """Raises ConfigError when evaluate did not measure the KPI (latency_ms_p99 from fewer
    than 200 timed calls)."""
    if cfg.kpi not in ev.metrics:
        raise ConfigError(
            f"params.yaml: promote.gates: {name}: {cfg.kpi} is not in evaluate's metrics.json "
            f"(it timed {ev.metrics.get('latency_runs', '?')} calls; p99 needs "
            f">= {P99_MIN_RUNS}: raise evaluate.latency_runs or gate on latency_ms_p95)"
        )
    value = float(ev.metrics[cfg.kpi])
    ok = OPS[cfg.op](value, cfg.value)
    sign = cfg.op if ok else {">=": "<", "<=": ">", ">": "<=", "<": ">="}[cfg.op]
    return Verdict(
        name,
        cfg.kind,
        ok,
        f"{cfg.kpi} {value:.4g} {sign} {cfg.value:g}",
        {"value": value, "op": cfg.op, "threshold": cfg.value},
    )


@gate("relative")
def relative(cfg, ev: Evidence, name: str) -> Verdict:
    delta = float(ev.metrics[f"delta_{cfg.kpi}"]) * POINTS
    ok = delta >= cfg.min_delta_points
    return Verdict(
        name,
        cfg.kind,
        ok,
        f"{cfg.kpi} vs FP32 {delta:+.2f} points {'>=' if ok else '<'} {cfg.min_delta_points:+g}",
        {"delta_points": delta, "min_delta_points": cfg.min_delta_points},
    )


@gate("per_class")
def per_class(cfg, ev: Evidence, name: str) -> Verdict:
    deltas = {c: d * POINTS for c, d in ev.metrics["delta_ap50_per_class"].items() if d is not None}
    if not deltas:
        return Verdict(name, cfg.kind, True, "no class with ground truth", {})
    worst = min(deltas, key=deltas.get)
    drop = -deltas[worst]
    losers = sorted(c for c, d in deltas.items() if -d > cfg.max_drop_points)
    ok = not losers
    reason = (
        f"worst class {worst} loses {drop:.2f} points <= {cfg.max_drop_points:g}"
        if ok
        else f"classes {', '.join(losers)} lose more than {cfg.max_drop_points:g} points of "
        f"AP@0.5 vs FP32 (worst: class {worst}, {drop:.2f})"
    )
    return Verdict(
        name,
        cfg.kind,
        ok,
        reason,
        {"worst_class": worst, "worst_drop_points": drop, "max_drop_points": cfg.max_drop_points},
    )


@gate("non_regression")
def non_regression(cfg, ev: Evidence, name: str) -> Verdict:
    if ev.champion is None:
        return Verdict(name, cfg.kind, True, "no champion", {"champion_version": None})
    c = ev.champion
    b = paired_bootstrap(
        c.gt,
        c.challenger_rows,
        c.champion_rows,
        resamples=cfg.resamples,
        confidence=cfg.confidence,
        seed=cfg.seed,
    )
    diff, lo, hi = (b[k] * POINTS for k in ("diff", "ci_low", "ci_high"))
    ok = hi >= -cfg.tolerance_points
    level = f"{100 * cfg.confidence:g}% CI"
    reason = (
        f"mAP@0.5 vs champion v{c.version}: {diff:+.2f} points, {level} [{lo:+.2f}, {hi:+.2f}]"
        + ("" if ok else f": worse beyond noise (upper bound < -{cfg.tolerance_points:g})")
    )
    return Verdict(
        name,
        cfg.kind,
        ok,
        reason,
        {
            "champion_version": c.version,
            "diff_points": diff,
            "ci_low_points": lo,
            "ci_high_points": hi,
            "challenger_map50": b["challenger_map50"],
            "champion_map50": b["champion_map50"],
            "confidence": cfg.confidence,
            "resamples": cfg.resamples,
            "tolerance_points": cfg.tolerance_points,
            "images": b["images"],
        },
    )
