"""Engine targets, registered by name. `build_engine@<target>` builds one, `evaluate@<target>`
loads it as a runner: float32 (B, 3, S, S) in [0, 1] -> (num, boxes, scores, classes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.config import BuildEngineCfg
from tasks.errors import ConfigError

Runner = Callable[[np.ndarray], Sequence[np.ndarray]]


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
    from tasks.engines import onnx_runtime  # noqa: F401  (registers "onnxruntime")

    if name not in ENGINES:
        raise ConfigError(f"unsupported engine target {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name]
