"""Section `promote`: the KPI gates a candidate must pass to become champion, and the registry."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tasks.harness.sections import Section

# KPI keys of evaluate's metrics.json (DESIGN.md spelling) that a gate may name.
QUALITY_KPIS = ("map50", "map50_95", "precision", "recall")
Kpi = Literal[
    "map50",
    "map50_95",
    "precision",
    "recall",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "throughput_ips",
    "size_mb",
    "params",
    "macs",
]
QualityKpi = Literal["map50", "map50_95", "precision", "recall"]


class _Gate(Section):
    name: str | None = Field(
        None, description="name in decision.json and the registry (default: derived from kind)"
    )


class AbsoluteGate(_Gate):
    """The candidate's KPI against a fixed bound, in the KPI's own unit (`map50 >= 0.9`)."""

    kind: Literal["absolute"]
    kpi: Kpi = Field(description="KPI key of evaluate's metrics.json")
    op: Literal[">=", "<=", ">", "<"] = Field(description="comparison: KPI <op> value")
    value: float = Field(description="bound, in the KPI's unit (mAP 0..1, ms, MB, ...)")


class RelativeGate(_Gate):
    """The candidate's quality KPI minus the FP32 baseline's (evaluate's `delta_<kpi>`)."""

    kind: Literal["relative"]
    kpi: QualityKpi = Field("map50", description="quality KPI compared with FP32")
    min_delta_points: float = Field(
        description="smallest allowed candidate - FP32 difference, in points (1 point = 0.01)"
    )


class PerClassGate(_Gate):
    """No class's AP@0.5 may fall more than `max_drop_points` below the FP32 baseline's."""

    kind: Literal["per_class"]
    max_drop_points: float = Field(
        ge=0, description="largest allowed per-class AP@0.5 loss, points"
    )


class NonRegressionGate(_Gate):
    """Candidate vs the current champion on the same test split: paired bootstrap over images
    of the mAP@0.5 difference; refused when the whole confidence interval lies below
    -tolerance (worse beyond noise). Passes with no champion."""

    kind: Literal["non_regression"]
    tolerance_points: float = Field(
        0.5, ge=0, description="refuse when the CI's upper bound < -tolerance (points)"
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided CI level")
    resamples: int = Field(1000, ge=50, le=100_000, description="bootstrap resamples")
    seed: int = Field(0, description="bootstrap seed")


Gate = Annotated[
    AbsoluteGate | RelativeGate | PerClassGate | NonRegressionGate, Field(discriminator="kind")
]


def gate_name(gate: AbsoluteGate | RelativeGate | PerClassGate | NonRegressionGate) -> str:
    """`name` when given, else `<kind>[.<kpi>]` (e.g. `absolute.map50`, `per_class`)."""
    if gate.name:
        return gate.name
    kpi = getattr(gate, "kpi", None)
    return f"{gate.kind}.{kpi}" if kpi else gate.kind


class PromoteCfg(Section):
    """Gates and registry settings of the `promote` stage (MLflow model registry)."""

    target: Literal["onnxruntime", "openvino", "tensorrt", "litert"] = Field(
        "onnxruntime",
        description="engine target whose evaluate KPIs gate the candidate and which the "
        "registered pyfunc serves (must be one of build_engine.targets)",
    )
    gates: list[Gate] = Field(
        default_factory=list, description="every gate must pass for the candidate to be champion"
    )
    allow_no_gates: bool = Field(
        False,
        description="true: an empty `gates` list is meant (every candidate becomes champion); "
        "without it `promote` refuses to run with no gates",
    )
    require_approval: bool = Field(
        False,
        description="the Prefect flow pauses before `promote` for a human decision; the stage "
        "itself ignores this",
    )
    lock_timeout_s: float = Field(
        120.0,
        gt=0,
        description="an alias move left unfinished this long is taken as abandoned (crashed)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> PromoteCfg:
        names = [gate_name(g) for g in self.gates]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"gate names must be unique (give each a `name`): {dup}")
        return self
