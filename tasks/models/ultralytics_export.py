"""Ultralytics' own OpenVINO export of a YOLO model, compiled and run like the project's engines.

`ultralytics_exports` runs `YOLO(weights).export(format="openvino", quantize=8 or None, ...)`
(`int8=True/False` before Ultralytics 8.4; INT8 calibrates with NNCF on the data.yaml split it
is given, keeping the Detect head in float) on a copy of the weights in a folder of its own, and
compiles each IR on the CPU as the project's openvino engine does (`compile_ir`). A compiled
export runs as the model alone (`raw_runner`: the raw (1, 4 + C, N)) or with Ultralytics' NMS
on the host (`detection_runner`: the project's runner signature). `ReferenceCfg` says how the
export is made and measured; `reference_cfg` makes the one that measures like the project's
own engines. What is measured, and how: tasks/models/ultralytics_ref.py.

Ultralytics is imported only after `offline_ultralytics()` (tasks/models/ultralytics_offline.py)
has switched off every path to the network.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from tasks.harness.errors import ConfigError
from tasks.harness.sections import PosInt, Section
from tasks.models.ultralytics_offline import offline_ultralytics
from tasks.preprocess.letterbox import input_wh

VARIANTS = {"ultralytics_openvino_fp32": False, "ultralytics_openvino_int8": True}


class ReferenceCfg(Section):
    """How Ultralytics' export is made and measured (defaults: Ultralytics' own)."""

    imgsz: tuple[PosInt, PosInt] = Field(
        (128, 128),
        description="export and evaluation input (width, height), px (the project's "
        "train.input_size; handed to Ultralytics as its [h, w])",
    )
    threads: PosInt = Field(2, description="OpenVINO INFERENCE_NUM_THREADS (build_engine.threads)")
    precision: Literal["f32", "bf16"] | None = Field(
        "f32",
        description="OpenVINO INFERENCE_PRECISION_HINT for float layers (build_engine."
        "openvino_precision); None: OpenVINO's CPU default (bf16 where the CPU has it)",
    )
    calibration_split: str = Field("val", description="data.yaml split NNCF calibrates on")
    fraction: float = Field(1.0, gt=0, le=1, description="share of that split used")
    conf: float = Field(0.001, ge=0, lt=1, description="NMS score floor (Ultralytics' val)")
    iou: float = Field(0.7, gt=0, le=1, description="NMS IoU (Ultralytics' val)")
    max_det: PosInt = Field(300, description="detections kept per image (Ultralytics' val)")
    timed_conf: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="NMS score floor of the timed model + NMS runner (Ultralytics' predict "
        "default; reference_cfg sets export.score_floor, the floor of our in-graph NMS)",
    )
    timed_max_det: PosInt = Field(
        300,
        description="detections kept by the timed runner (reference_cfg: export.max_detections)",
    )
    score_threshold: float = Field(0.3, gt=0, lt=1, description="evaluate.score_threshold")
    warmup: int = Field(10, ge=0, description="untimed calls before each timed block")
    runs: PosInt = Field(200, description="timed batch-1 calls per variant")
    rounds: PosInt = Field(5, description="alternating timing rounds")

    @field_validator("imgsz", mode="before")
    @classmethod
    def _side(cls, v):
        """One side (a square) or [w, h] -> (w, h)."""
        return input_wh(v) if isinstance(v, (int, list, tuple)) else v

    @property
    def ultralytics_imgsz(self) -> list[int]:
        """Ultralytics' imgsz: [height, width]."""
        return [self.imgsz[1], self.imgsz[0]]


def reference_cfg(params, **overrides) -> ReferenceCfg:
    """The ReferenceCfg that measures like the project's own engines under `params` (Params):
    input side `train.input_size`, `build_engine.threads` and `.openvino_precision`,
    `evaluate.score_threshold`, and the timed NMS keeping what our in-graph NMS keeps
    (`export.score_floor`, `export.max_detections`); `overrides` (e.g. runs, rounds) win."""
    base = {
        "imgsz": params.train.input_size,
        "threads": params.build_engine.threads,
        "precision": params.build_engine.openvino_precision,
        "score_threshold": params.evaluate.score_threshold,
        "timed_conf": params.export.score_floor,
        "timed_max_det": params.export.max_detections,
    }
    return ReferenceCfg(**{**base, **overrides})


REQUIRES = ("ultralytics", "openvino", "nncf")  # nncf: Ultralytics' INT8 path for OpenVINO


def skip_reason() -> str | None:
    """None when the reference can run here, else `skipped: ...` naming the missing packages
    (a reported status, not a crash: see DESIGN.md "Bad input and faults")."""
    import importlib.util

    missing = [m for m in REQUIRES if importlib.util.find_spec(m) is None]
    return f"skipped: {', '.join(missing)} not installed" if missing else None


def _export(weights_pt: Path, data_yaml: Path, int8: bool, cfg: ReferenceCfg, work: Path) -> Path:
    """Ultralytics' OpenVINO export of a copy of `weights_pt` under `work`; the IR's .xml."""
    if why := skip_reason():
        raise ConfigError(f"Ultralytics' OpenVINO export: {why.removeprefix('skipped: ')}")
    offline_ultralytics()
    from ultralytics import YOLO

    folder = work / ("int8" if int8 else "fp32")
    folder.mkdir(parents=True)
    pt = folder / "model.pt"  # export writes next to the weights: never beside the user's file
    shutil.copyfile(weights_pt, pt)
    exported = YOLO(str(pt)).export(
        format="openvino",
        quantize=8 if int8 else None,  # Ultralytics 8.4's spelling of int8=True
        data=str(data_yaml),
        imgsz=cfg.ultralytics_imgsz,
        batch=1,
        split=cfg.calibration_split,
        fraction=cfg.fraction,
        device="cpu",
        verbose=False,
    )
    xml = sorted(Path(exported).glob("*.xml"))
    if not xml:
        raise ConfigError(f"ultralytics: OpenVINO export wrote no .xml under {exported}")
    return xml[0]


def compile_ir(xml: Path, cfg: ReferenceCfg):
    """The IR compiled on the CPU as the project's openvino engine compiles: LATENCY hint,
    `cfg.threads` threads, `cfg.precision` for float layers."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": cfg.threads}
    if cfg.precision:
        config["INFERENCE_PRECISION_HINT"] = cfg.precision
    return ov.Core().compile_model(str(xml), "CPU", config)


def raw_runner(compiled):
    """float32 (1, 3, S, S) in [0, 1] -> the model's raw (1, 4 + C, N): xywh in input pixels,
    class scores after sigmoid."""
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[output]

    return run


def ultralytics_nms(raw: np.ndarray, size: int, cfg: ReferenceCfg) -> list[np.ndarray]:
    """Ultralytics' own NMS (ultralytics.utils.nms.non_max_suppression) on raw (B, 4 + C, N):
    (num (B,), boxes (B, K, 4) xyxy input pixels, scores (B, K), classes (B, K)), K = max_det,
    rows past num zero: the project's runner signature (tasks/metrics/detection.py). Boxes are
    clipped
    to the `size` x `size` input, as Ultralytics' predictor and validator clip to the image."""
    import torch
    from ultralytics.utils.nms import non_max_suppression

    kept = non_max_suppression(
        torch.from_numpy(np.ascontiguousarray(raw)), cfg.conf, cfg.iou, max_det=cfg.max_det
    )
    b, k = len(kept), cfg.max_det
    num = np.zeros(b, np.int32)
    boxes = np.zeros((b, k, 4), np.float32)
    scores = np.zeros((b, k), np.float32)
    classes = np.zeros((b, k), np.int32)
    for j, det in enumerate(kept):  # det: (n, 6) x1 y1 x2 y2 score class, by score
        d = det.numpy()
        n = num[j] = len(d)
        boxes[j, :n] = np.clip(d[:, :4], 0, size)
        scores[j, :n], classes[j, :n] = d[:, 4], d[:, 5]
    return [num, boxes, scores, classes]


def detection_runner(compiled, cfg: ReferenceCfg):
    """The compiled export + Ultralytics' NMS as a project runner (tasks.metrics.detection.Runner),
    any
    batch size, one image per call of the batch-1 model."""
    raw = raw_runner(compiled)

    def run(x: np.ndarray) -> list[np.ndarray]:
        outs = [ultralytics_nms(raw(x[i : i + 1]), x.shape[-1], cfg) for i in range(len(x))]
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    return run


@dataclass
class UltralyticsExport:
    """One Ultralytics OpenVINO export, compiled as `cfg` says."""

    name: str
    xml: Path
    compiled: object  # openvino.CompiledModel
    cfg: ReferenceCfg

    def raw_runner(self):
        """Model only: the raw (1, 4 + C, N)."""
        return raw_runner(self.compiled)

    def detection_runner(self, timed: bool = False):
        """Model + Ultralytics' NMS on the host: the project's (num, boxes, scores, classes).
        NMS keeps what mAP needs (cfg.conf, cfg.max_det), or, `timed`, what a deployment
        keeps (cfg.timed_conf, cfg.timed_max_det): the runner to time beside our engines."""
        cfg = self.cfg
        if timed:
            cfg = cfg.model_copy(update={"conf": cfg.timed_conf, "max_det": cfg.timed_max_det})
        return detection_runner(self.compiled, cfg)

    @property
    def size_mb(self) -> float:
        """The IR's .xml + .bin."""
        return sum(self.xml.with_suffix(s).stat().st_size for s in (".xml", ".bin")) / 2**20

    def facts(self) -> dict:
        from tasks.engines.openvino_cpu import conv_precisions

        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return {
            "runtime": "openvino",
            "size_mb": self.size_mb,
            "conv_precisions": conv_precisions(self.compiled),
            "inference_precision_used": hint.get_type_name(),
        }


def ultralytics_exports(
    weights_pt: Path,
    data_yaml: Path,
    cfg: ReferenceCfg,
    work: Path,
    names: Iterable[str] = VARIANTS,
) -> dict[str, UltralyticsExport]:
    """Ultralytics' OpenVINO exports (`names`: keys of VARIANTS) of `weights_pt` under `work`,
    compiled on the CPU (LATENCY hint, `cfg.threads` threads, `cfg.precision`). The INT8 one
    is calibrated by NNCF on `data_yaml`'s `cfg.calibration_split` (`cfg.fraction` of it)."""
    out = {}
    for name in names:
        if name not in VARIANTS:
            raise ConfigError(f"unknown Ultralytics export {name!r}; choose from {list(VARIANTS)}")
        xml = _export(Path(weights_pt), Path(data_yaml), VARIANTS[name], cfg, Path(work) / name)
        out[name] = UltralyticsExport(name, xml, compile_ir(xml, cfg), cfg)
    return out


def ultralytics_macs(weights_pt: Path, imgsz: int | list[int]) -> int:
    """MACs at batch 1 by Ultralytics' own count (thop; it reports GFLOPs = 2 x MACs);
    `imgsz` in Ultralytics' order (a side or [h, w])."""
    offline_ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    return int(round(get_flops(YOLO(str(weights_pt)).model, imgsz) * 1e9 / 2))
