"""`params.yaml: model`: which model family the pipeline compresses, and each family's config."""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import Field, model_validator

from tasks.harness.sections import SafePath, Section


class CenterNetCfg(Section):
    """The built-in CenterNet-style detector (tasks/models/centernet.py)."""

    width: float = Field(1.0, gt=0, le=4, description="channel multiplier")
    depth: int = Field(1, ge=1, le=6, description="extra conv blocks per backbone stage")


class YoloCfg(Section):
    """Ultralytics YOLO detect models (tasks/models/yolo.py; the `yolo` extra, AGPL-3.0)."""

    yaml: str = Field(
        "yolov8n.yaml",
        description="Ultralytics model yaml to build from scratch (yolov8n.yaml, yolo11s.yaml, "
        "...; the scale letter picks depth/width) when model.weights is not set",
    )


class ImportedCfg(Section):
    """An imported detector (`family: onnx`, tasks/models/onnx_import.py)."""

    iou_threshold: float = Field(
        0.7,
        gt=0,
        le=1,
        description="outputs yolo_raw: IoU above which the appended class-aware NMS drops the "
        "lower-scoring box (Ultralytics' default 0.7)",
    )


# Each input side of a built-in family must be a multiple of this (its adapter's `input_stride`
# says the same; tests/test_rect_input.py checks they agree). Kept here, beside the config, so
# params.yaml is checked without importing a model family (Ultralytics is heavy).
BUILTIN_STRIDES = {"centernet": 16, "yolo": 32}


class ModelCfg(Section):
    family: str = Field(
        "centernet",
        description="a registered model family: centernet (built-in), yolo (Ultralytics), onnx "
        "(an imported detector: post-training stages only)",
    )
    factory: str | None = Field(
        None,
        description="'package.module:function' returning a ModelAdapter for a user's own family "
        "(overrides family)",
    )
    path: SafePath = Field(
        "data/models",
        description="the folder holding the user's model files: model.weights and model.onnx "
        "lie under it (dvc.yaml depends on it, so a changed file re-runs the pipeline)",
    )
    weights: SafePath | None = Field(
        None,
        description="a user's trained checkpoint to start from (yolo: an Ultralytics .pt, a "
        "pickle: loaded only from this path, its MD5 recorded)",
    )
    onnx: SafePath | None = Field(None, description="family onnx: the imported detector's file")
    outputs: Literal["detections", "yolo_raw"] = Field(
        "detections",
        description="family onnx: the file's output convention: `detections` = the project's "
        "num_detections, boxes, scores, classes; `yolo_raw` = Ultralytics-style (B, 4 + C, N) "
        "predictions, to which decode + NMS are appended",
    )
    centernet: CenterNetCfg = CenterNetCfg()
    yolo: YoloCfg = YoloCfg()
    imported: ImportedCfg = ImportedCfg()

    @property
    def input_stride(self) -> int:
        """What each input side must be a multiple of, for a built-in family (1 otherwise: a
        user's factory or an imported ONNX checks its own input)."""
        return 1 if self.factory else BUILTIN_STRIDES.get(self.family, 1)

    @model_validator(mode="after")
    def _files_under_path(self) -> ModelCfg:
        root = PurePath(self.path)
        for key in ("weights", "onnx"):
            value = getattr(self, key)
            if value is not None and (
                ".." in PurePath(value).parts or not PurePath(value).is_relative_to(root)
            ):
                raise ValueError(
                    f"model.{key}: {value!r} must lie under model.path ({self.path}), the "
                    "folder DVC tracks for the pipeline"
                )
        return self

    @model_validator(mode="after")
    def _onnx_needs_a_file(self) -> ModelCfg:
        if self.family == "onnx" and not self.factory and self.onnx is None:
            raise ValueError("model.onnx: family onnx needs the imported model's path")
        return self
