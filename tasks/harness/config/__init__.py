"""Typed, validated params.yaml: one pydantic model per stage, unknown keys rejected.

`load_params` is called by every entry point before any work; a bad file raises ConfigError whose
message reads `params.yaml: <key.path>: <problem>`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from tasks.harness.config.data import (
    SHAPE_COLOURS,
    VOC_CLASSES,
    DataCfg,
    DatasetCfg,
    LabelNoiseCfg,
    ProjectCfg,
    ShapesCfg,
    SplitCfg,
)
from tasks.harness.config.deploy import (
    BuildEngineCfg,
    EvaluateCfg,
    ExportCfg,
    FlowCfg,
    QuantizeCfg,
    VariantsCfg,
)
from tasks.harness.config.label_qa import (
    LabelQaCfg,
    LabelQaModelCfg,
)
from tasks.harness.config.promote import (
    QUALITY_KPIS,
    AbsoluteGate,
    Gate,
    Kpi,
    NonRegressionGate,
    PerClassGate,
    PromoteCfg,
    QualityKpi,
    RelativeGate,
    gate_name,
)
from tasks.harness.config.training import (
    AugmentStep,
    ChannelShuffleAug,
    DistillCfg,
    HFlipAug,
    HsvAug,
    MosaicAug,
    PruneCfg,
    ScaleJitterAug,
    ShiftAug,
    TrainCfg,
    VFlipAug,
)
from tasks.harness.errors import ConfigError
from tasks.harness.sections import (
    InputSize,
    NonNegInt,
    PosInt,
    Rate,
    SafePath,
    Section,
    Side,
    stride_problem,
)
from tasks.models.config import ModelCfg

__all__ = [
    "AbsoluteGate",
    "AugmentStep",
    "BuildEngineCfg",
    "ChannelShuffleAug",
    "DataCfg",
    "DatasetCfg",
    "DistillCfg",
    "EvaluateCfg",
    "ExportCfg",
    "FlowCfg",
    "Gate",
    "HFlipAug",
    "HsvAug",
    "InputSize",
    "Kpi",
    "LabelNoiseCfg",
    "LabelQaCfg",
    "LabelQaModelCfg",
    "ModelCfg",
    "MosaicAug",
    "NonNegInt",
    "NonRegressionGate",
    "Params",
    "PerClassGate",
    "PosInt",
    "ProjectCfg",
    "PromoteCfg",
    "PruneCfg",
    "QUALITY_KPIS",
    "QualityKpi",
    "QuantizeCfg",
    "RelativeGate",
    "SHAPE_COLOURS",
    "SafePath",
    "ScaleJitterAug",
    "ShapesCfg",
    "Rate",
    "Section",
    "ShiftAug",
    "Side",
    "SplitCfg",
    "TrainCfg",
    "VFlipAug",
    "VOC_CLASSES",
    "VariantsCfg",
    "gate_name",
    "load_params",
    "stride_problem",
]


class Params(Section):
    project: ProjectCfg = ProjectCfg()
    model: ModelCfg = ModelCfg()
    dataset: DatasetCfg = DatasetCfg()
    data: DataCfg = DataCfg()
    label_qa: LabelQaCfg = LabelQaCfg()
    train: TrainCfg = TrainCfg()
    prune: PruneCfg = PruneCfg()
    distill: DistillCfg = DistillCfg()
    export: ExportCfg = ExportCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    build_engine: BuildEngineCfg = BuildEngineCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    variants: VariantsCfg = VariantsCfg()
    flow: FlowCfg = FlowCfg()
    promote: PromoteCfg = PromoteCfg()

    @model_validator(mode="after")
    def _promote_target_is_built(self) -> Params:
        if self.promote.target not in self.build_engine.targets:
            raise ValueError(
                f"promote.target: {self.promote.target!r} is not built; choose one of "
                f"build_engine.targets ({', '.join(self.build_engine.targets)})"
            )
        return self

    @model_validator(mode="after")
    def _promote_has_gates(self) -> Params:
        if "promote" in self.model_fields_set and not (
            self.promote.gates or self.promote.allow_no_gates
        ):
            raise ValueError(
                "promote.gates: empty: every candidate would become champion; list gates, or "
                "set promote.allow_no_gates: true to promote without any"
            )
        return self

    @model_validator(mode="after")
    def _input_fits_the_family(self) -> Params:
        stride, family = self.model.input_stride, self.model.family
        for key, size in (
            ("train.input_size", self.train.input_size),
            ("label_qa.model.input_size", self.label_qa.model.input_size),
        ):
            if problem := stride_problem(key, size, stride, family):
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _int8_fits_targets(self) -> Params:
        from tasks.engines.int8 import ACCEPTS, conflicts

        q = self.quantize
        if q.precision == "int8" and (
            bad := conflicts(q.activation_type, self.build_engine.targets)
        ):
            raise ValueError(
                f"quantize.activation_type: {q.activation_type} cannot serve "
                f"build_engine.targets {', '.join(bad)} (accepts "
                f"{'; '.join(f'{t}: ' + '/'.join(ACCEPTS[t]) for t in bad)}); use auto"
            )
        return self


_KEYED = re.compile(r"^Value error, ([a-z_]+(?:\.[a-z_0-9]+)+): (.*)$", re.S)


def _format(file: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if not e["loc"] and (m := _KEYED.match(msg)):  # a cross-section check names its key
            key, msg = m.group(1), m.group(2)
        lines.append(f"{file}: {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", require: tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml.

    Args:
        path: the params file.
        require: sections that must be written in the file (a stage refuses to run on built-in
            defaults for the sections it reads: an empty or wrong file is not a valid config).

    Raises:
        ConfigError: the file is missing, not YAML, lacks a required section, or any key is
            unknown, mistyped or out of range.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping of sections")
    missing = [s for s in require if not isinstance(raw.get(s), dict)]
    if missing:
        raise ConfigError(
            f"{path}: {', '.join(missing)}: section missing (this stage reads it and does not "
            "run on built-in defaults)"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(path.name, e)) from e
