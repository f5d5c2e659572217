"""LiteRT's own INT8 model for the quantize stage: the TFLite converter's full-integer model,
calibrated on the same images as the QDQ models, with the accuracy-aware fallback to float."""

from __future__ import annotations

from pathlib import Path

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import QuantizeCfg
from tasks.harness.io import write_json
from tasks.metrics.detection import coco_map, predict
from tasks.quantization.qdq import calibration_set


def litert_model(
    cfg: QuantizeCfg, src: Path, dst: Path, train: DetectionSet, val: DetectionSet, fp32_map: float
) -> dict:
    """LiteRT's model for `cfg.precision` at `dst` (.tflite + its decode ONNX): full-integer
    INT8 calibrated by the TFLite converter on `calibration_set`'s images (same ids and seed as
    the QDQ models), float32 instead when INT8 loses more than `max_map_drop` val mAP@0.5 and
    `accuracy_aware` is on (the converter quantizes every layer or none)."""
    from tasks.engines import litert

    if reason := litert.unavailable():
        return {"status": reason}
    images, _, ids_md5 = calibration_set(cfg, train)
    precision = {"int8": "int8", "fp16": "float16", "fp32": "float32"}[cfg.precision]
    try:
        facts = litert.convert(src, dst, precision, images if precision == "int8" else None)
    except litert.Unconvertible as e:  # a model structure the target does not take
        return {"status": f"skipped: {e}"}
    result = {"status": "ok", "precision": precision, "reason": "as configured"}
    if precision == "int8":
        runner = litert.runner(dst, threads=1)
        int8_map = coco_map(val.coco, predict(runner, val))["map50"]
        result |= {
            "calibration_md5": ids_md5,
            "calibrator": "TFLite converter (min/max over the calibration images)",
            "val_map50_int8": int8_map,
            "int8_map_drop": fp32_map - int8_map,
        }
        if cfg.accuracy_aware and fp32_map - int8_map > cfg.max_map_drop:
            facts = litert.convert(src, dst, "float32")
            result["precision"] = "float32"
            result["reason"] = (
                f"full-integer INT8 lost {fp32_map - int8_map:.4f} val mAP@0.5 "
                f"(> quantize.max_map_drop {cfg.max_map_drop}): kept float32"
            )
    write_json(dst.with_suffix(".json"), {**facts, **result})
    return result
