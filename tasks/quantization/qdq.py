"""ONNX Runtime's QDQ quantization primitives every stage that makes or measures an INT8 model
shares (quantize, variants, the size benchmark): the calibration set, calibration with a named
calibrator, QDQ INT8 of the convolutions, FP16, and a model's val mAP@0.5 on ONNX Runtime.

Only convolutions are quantized; the in-graph decode (sigmoid, peak pooling, top-K, NMS) stays
float, and so do integral convs (a box distribution's fixed bin centres: `integral_convs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import QuantizeCfg
from tasks.harness.errors import ConfigError
from tasks.metrics.detection import coco_map, predict
from tasks.models.onnx_decode import integral_convs

log = logging.getLogger(__name__)
CALIBRATORS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANTIZED_OPS = ["Conv"]
NUM_QUANTIZED_BINS = 128


class _Images(CalibrationDataReader):
    """Feeds calibration images in batches of 8: (8, 3, S, S) float32."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.pos = images, 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.images):
            return None
        batch = self.images[self.pos : self.pos + 8]
        self.pos += 8
        return {"images": batch}

    def rewind(self) -> None:
        self.pos = 0


def calibration_set(cfg: QuantizeCfg, train: DetectionSet) -> tuple[np.ndarray, list[int], str]:
    """Draw the calibration images from the train split: (images, image ids, md5 of the ids)."""
    if cfg.calibration_images > len(train):
        raise ConfigError(
            f"params.yaml: quantize.calibration_images: {cfg.calibration_images} exceeds the "
            f"{len(train)} images of the train split"
        )
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(train), size=cfg.calibration_images, replace=False))
    ids = [int(train.ids[i]) for i in idx]
    return train.batch(idx), ids, hashlib.md5(json.dumps(ids).encode()).hexdigest()


def calibrate(
    src: Path, images: np.ndarray, cfg: QuantizeCfg, calibrator: str, cache: Path
) -> None:
    """Collect activation ranges with ONNX Runtime's calibrator and save them to `cache`.

    Called directly rather than through quantize_static because quantize_static cannot pass the
    histogram sizes: with its defaults (128 bins, 128 quantized bins) the entropy (KL) search has
    nothing to choose from and returns the min/max range. The cache also lets the per-layer
    sensitivity sweep calibrate once.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options = {"symmetric": cfg.activation_type == "qint8"}
    if calibrator == "entropy":
        options |= {"num_bins": 2048, "num_quantized_bins": NUM_QUANTIZED_BINS}
    if calibrator == "percentile":
        options |= {"num_bins": 2048, "percentile": cfg.percentile}
    with tempfile.TemporaryDirectory(dir=Path(cache).parent) as tmp:
        calib = create_calibrator(
            src,
            QUANTIZED_OPS,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CALIBRATORS[calibrator],
            extra_options=options,
        )
        calib.collect_data(_Images(images))
        save_tensors_data(calib.compute_data(), cache)


def to_int8(
    src: Path,
    dst: Path,
    cache: Path,
    cfg: QuantizeCfg,
    calibrator: str,
    only: list[str] | None = None,
    exclude: list[str] | None = None,
) -> None:
    """QDQ-quantize the convolutions of `src` into `dst` (all, `only` these, or all but
    `exclude`) with the activation ranges in `cache` (see `calibrate`). Integral convs (a box
    distribution's fixed bin centres: `integral_convs`) always stay float."""
    fixed = integral_convs(onnx.load(str(src)))
    exclude = sorted({*(exclude or []), *fixed}) or None
    quantize_static(
        str(src),
        str(dst),
        None,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8 if cfg.activation_type == "qint8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=only,
        nodes_to_exclude=exclude,
        calibrate_method=CALIBRATORS[calibrator],
        calibration_cache_path=str(cache),
        extra_options={
            "WeightSymmetric": True,
            "ActivationSymmetric": cfg.activation_type == "qint8",
        },
    )


def to_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute, float32 inputs and outputs (ONNX Runtime's converter with its
    default block list of ops that have no FP16 kernels)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(sess: ort.InferenceSession):
    return lambda x: sess.run(None, {"images": x})


def val_map(path: Path, val: DetectionSet, threads: int) -> float:
    return coco_map(val.coco, predict(runner(session(path, threads)), val))["map50"]


def _quantizable(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    fixed = set(integral_convs(model))
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in fixed]


def conv_names(path: Path) -> list[str]:
    return [n.name for n in _quantizable(onnx.load(str(path)))]


def layer_types(path: Path) -> dict[str, list[str]]:
    """The quantizable nodes of `path` grouped by kind ("3x3", "1x1", "depthwise 3x3", ...)."""
    types: dict[str, list[str]] = {}
    for node in _quantizable(onnx.load(str(path))):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kind = "x".join(str(k) for k in attrs.get("kernel_shape", []))
        kind = f"depthwise {kind}" if attrs.get("group", 1) > 1 else kind
        types.setdefault(kind, []).append(node.name)
    return types
