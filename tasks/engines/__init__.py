"""Engine targets, registered by name. `build_engine@<target>` builds one, `evaluate@<target>`
loads it as a runner: float32 (B, 3, H, W) in [0, 1] -> (num, boxes, scores, classes).

A target that cannot run here (runtime not installed, no device) returns `status:
"skipped: <reason>"` from `build` instead of raising, so `dvc repro` carries on and says why.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from tasks.harness.config import BuildEngineCfg
from tasks.harness.errors import ConfigError, GateFailed
from tasks.harness.signature import Runner

MODULES = {
    "onnxruntime": "onnx_runtime",
    "openvino": "openvino_cpu",
    "tensorrt": "tensorrt_gpu",
    "litert": "litert",
}


class Engine(Protocol):
    name: str
    engine_file: str  # file name inside the engine folder

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        """Build into `out_dir` (a fresh temp folder); return facts including `status`."""

    def load(self, out_dir: Path, cfg: BuildEngineCfg) -> Runner:
        """A runner over the built engine."""


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


def get(name: str) -> Engine:
    """The engine registered as `name` (its module is imported on first use)."""
    if name not in MODULES:
        raise ConfigError(f"unsupported engine target {name!r}; choose one of {', '.join(MODULES)}")
    importlib.import_module(f"tasks.engines.{MODULES[name]}")
    return ENGINES[name]


def engine_size_mb(out_dir: Path) -> float:
    """Size of the built engine: every file in its folder but the build facts."""
    files = [f for f in Path(out_dir).iterdir() if f.is_file() and f.name != "engine.json"]
    return sum(f.stat().st_size for f in files) / 2**20


def is_quantized(onnx_path: Path) -> bool:
    import onnx  # here: params validation imports this package, and onnx takes ~1 s to import

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_path)).graph.node)


def check_int8(onnx_path: Path, conv_precisions: dict[str, int], target: str) -> None:
    """An INT8 (QDQ) model whose convolutions all execute in float is an error, not a result.

    `conv_precisions` counts the convolutions by the precision the runtime reports executing.
    """
    int8 = sum(v for k, v in conv_precisions.items() if k in ("i8", "u8", "int8", "uint8"))
    if is_quantized(onnx_path) and int8 == 0:
        raise GateFailed(
            f"{target}: {onnx_path} is quantized (QDQ) but no convolution executes in INT8 "
            f"(runtime reports {conv_precisions}); the engine would silently run in float"
        )
