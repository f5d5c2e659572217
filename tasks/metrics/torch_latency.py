"""Batch-1 latency of PyTorch detectors on an engine target, measured in-process.

Each model is exported (BatchNorm folded, decoding in the graph: the deployed signature) with
PyTorch's TorchScript exporter at batch 1, which takes a fraction of the dynamo exporter's time
and yields the same convolutions, then built and loaded by the engine target as
`build_engine` does. All models are timed in one `tasks.metrics.timing.time_blocks` call (shuffled
blocks with pause and re-warm), so ratios between them come from the same process and the same
minutes of machine load.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tasks import engines
from tasks.harness.config import BuildEngineCfg
from tasks.harness.errors import ConfigError
from tasks.metrics.timing import time_blocks
from tasks.models import OUTPUTS, ModelAdapter
from tasks.preprocess.letterbox import input_wh

log = logging.getLogger(__name__)


def export_for_timing(adapter: ModelAdapter, model: torch.nn.Module, path: Path) -> Path:
    """`model` (eval, BatchNorm folded, with decode) as a batch-1 ONNX graph at `path`."""
    wrapped = adapter.deployable(model, max_detections=100, score_floor=0.01)
    w, h = input_wh(adapter.input_size(model))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapped,
            (torch.zeros(1, 3, h, w),),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["images"],
            output_names=OUTPUTS,
        )
    return path


def measure(
    adapter: ModelAdapter,
    models: dict[str, torch.nn.Module],
    engine: str,
    cfg: BuildEngineCfg,
    *,
    warmup: int,
    runs: int,
    rounds: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seconds per batch-1 call of each model on `engine`: {name: (runs,)}.

    Raises:
        ConfigError: the engine target cannot run here (it reports `skipped: ...`).
    """
    target = engines.get(engine)
    w, h = input_wh(adapter.input_size(next(iter(models.values()))))
    batch = np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, model in models.items():
            folder = Path(tmp) / name
            folder.mkdir()
            onnx_path = export_for_timing(adapter, model, folder / "model.onnx")
            built = folder / "engine"
            built.mkdir()
            facts = target.build(onnx_path, built, cfg)
            if facts["status"] != "ok":
                raise ConfigError(f"params.yaml: prune.engine: {engine} cannot run here: "
                                  f"{facts['status']}")  # fmt: skip
            runners[name] = target.load(built, cfg)
        return time_blocks(runners, batch, warmup=warmup, runs=runs, rounds=rounds, seed=seed)
