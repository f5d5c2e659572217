"""Sections of the deployment stages: `export`, `quantize`, `build_engine`, `evaluate`,
`variants`, and the Prefect `flow`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.harness.sections import NonNegInt, PosInt, Section


class ExportCfg(Section):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset")
    max_detections: PosInt = Field(100, description="K of the in-graph top-K decode")
    score_floor: float = Field(0.01, ge=0, lt=1, description="detections below are not counted")
    simplifier: Literal["onnxsim", "onnxslim", "none"] = Field("onnxsim")
    parity_tolerance: float = Field(1e-3, gt=0, description="max |onnx - torch| allowed")
    parity_images: PosInt = Field(16, description="test images used for the parity check")
    parity_min_score: float = Field(
        0.1, ge=0, lt=1, description="detections below this score are not compared for parity"
    )


QuantizeMethod = Literal["ort", "nncf", "best"]
EngineTarget = Literal["onnxruntime", "openvino", "tensorrt", "litert"]


class QuantizeCfg(Section):
    """Post-training quantization of the exported ONNX with ONNX Runtime's tools (QDQ)."""

    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="precision of the deployable model/engines (if faster, see report)"
    )
    calibrator: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="activation-range calibrator (registered in tasks/quantize.py)"
    )
    percentile: float = Field(99.999, gt=90, le=100, description="for the percentile calibrator")
    calibration_images: PosInt = Field(64, description="train images used for calibration")
    seed: int = Field(0, description="which train images are drawn for calibration")
    activation_type: Literal["auto", "quint8", "qint8"] = Field(
        "auto",
        description="QDQ activation type: auto = what each build_engine target accepts (one "
        "model per distinct need: quint8 for ONNX Runtime CPU and OpenVINO, symmetric qint8 "
        "for TensorRT); quint8/qint8 = that type for every target (an error where one refuses it)",
    )
    accuracy_aware: bool = Field(
        True,
        description="where every-conv INT8 drops more than max_map_drop: measure per-layer "
        "sensitivity and keep the worst layers in float until it does not",
    )
    max_map_drop: float = Field(
        0.01, ge=0, le=1, description="largest val mAP@0.5 loss (0.01 = 1 point) INT8 may cost"
    )
    compare_calibrators: bool = Field(
        True,
        description="report every calibrator's val mAP, and variants' every-conv INT8 row per "
        "calibrator (int8_<calibrator>)",
    )
    keep_faster: bool = Field(
        True,
        description="keep a layer type (or the whole model) in float where INT8 measures "
        "slower (batch-1 latency)",
    )
    keep_faster_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="keep_faster takes float only when it measures this much faster (0.05 = "
        "5%) in the median and in every round: timing noise keeps INT8",
    )
    keep_faster_rounds: int = Field(
        5, ge=1, le=50, description="keep_faster timing rounds (order shuffled, median each)"
    )
    qat_epochs: NonNegInt = Field(
        0, description="quantization-aware fine-tuning epochs before INT8 export (0 = PTQ only)"
    )
    qat_lr: float = Field(1e-4, gt=0, description="learning rate of the QAT fine-tune")
    method: QuantizeMethod | dict[EngineTarget, QuantizeMethod] = Field(
        "ort",
        description="who makes each target's INT8 model: ort = ONNX Runtime's QDQ (above), "
        "nncf = NNCF's accuracy-controlled QDQ (ONNX Runtime and OpenVINO targets only), best = "
        "both, keeping the better val mAP@0.5 (ties: faster on that target); one value for "
        "every target or {target: method} (unnamed targets: ort)",
    )
    best_map_tie: float = Field(
        0.002,
        ge=0,
        le=1,
        description="method best: val mAP@0.5 differences up to this count as a tie, which the "
        "candidate measured faster on the target wins. 0.002 (0.2 points): two INT8 models of "
        "the default student differ by about 0.1 point on val (200 images) and their paired 95% "
        "interval on the 300 test images is about +-0.1 point; 0 lets such noise pick the slower",
    )


class BuildEngineCfg(Section):
    targets: list[Literal["onnxruntime", "openvino", "tensorrt", "litert"]] = Field(
        ["onnxruntime"], min_length=1, description="engine targets (one build/evaluate each)"
    )
    threads: PosInt = Field(2, description="intra-op threads of every CPU runtime")
    openvino_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="OpenVINO inference precision hint for float layers (CPU default "
        "is bf16 where the CPU has AMX/AVX512-BF16: f32 is set explicitly)",
    )
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field("LATENCY")
    openvino_fp16_weights: bool = Field(
        False, description="store float weights of the IR in FP16 (weight compression)"
    )
    tensorrt_precision: Literal["fp16", "fp32"] = Field(
        "fp16", description="float precision TensorRT may use; INT8 comes from the QDQ model"
    )
    tensorrt_batch: tuple[PosInt, PosInt, PosInt] = Field(
        (1, 8, 32), description="optimization profile min/opt/max batch"
    )
    tensorrt_workspace_mb: PosInt = Field(1024, description="builder workspace limit")


class EvaluateCfg(Section):
    score_threshold: float = Field(0.3, gt=0, lt=1, description="operating point for P/R")
    warmup: int = Field(10, ge=0, description="untimed calls before each timed block")
    latency_runs: PosInt = Field(60, description="timed batch-1 calls per runtime")
    throughput_batches: list[PosInt] = Field(
        [1, 8, 32], min_length=1, description="batch sizes for throughput; KPI at the largest"
    )
    throughput_runs: PosInt = Field(5)
    parity_iou: float = Field(0.5, gt=0, lt=1, description="IoU matching detections for parity")
    rounds: PosInt = Field(3, description="alternating benchmark rounds (order shuffled)")
    min_boxes: PosInt = Field(
        1, description="fewest boxes the cleaned test split may hold (fewer is an error)"
    )


class VariantsCfg(Section):
    peers: bool = Field(
        True,
        description="also the rows a user would get without Shrinkflow: NNCF's PTQ and "
        "accuracy-controlled INT8 on OpenVINO, and for family yolo Ultralytics' own OpenVINO "
        "INT8 export (each a few calibration and validation passes more)",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description="ours vs each peer: the paired bootstrap interval of the test mAP@0.5 "
        "difference, over test images, at this confidence (tasks/metrics/bootstrap.py)",
    )
    resamples: int = Field(1000, ge=100, description="... with this many resamples")


class FlowCfg(Section):
    """How the Prefect flow (flows/compress.py) runs each stage; no stage reads this section."""

    retries: int = Field(1, ge=0, description="re-runs of a failed stage before the flow fails")
    retry_delay_s: float = Field(
        10.0, ge=0, description="delay before the first retry; doubled for each later one"
    )
    timeout_s: float = Field(7200.0, gt=0, description="wall-clock limit of one stage attempt")
    stage_timeout_s: dict[str, float] = Field(
        {}, description="per-stage limits overriding timeout_s (foreach items as `name@item`)"
    )
    approval_timeout_s: float = Field(
        86400.0, gt=0, description="how long a run waits for a reviewer before `promote`"
    )
