"""ONNX Runtime on the CPU execution provider, full graph optimisation, saved optimised model."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from tasks.config import BuildEngineCfg
from tasks.engines import Runner, register

OUTPUTS = ["num_detections", "boxes", "scores", "classes"]


def _options(cfg: BuildEngineCfg, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class OnnxRuntimeCpu:
    name = "onnxruntime"
    engine_file = "model.ort.onnx"

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        opts = _options(cfg, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.optimized_model_filepath = str(out_dir / self.engine_file)
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return {
            "status": "ok",
            "provider": sess.get_providers()[0],
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "threads": cfg.threads,
            "onnxruntime": ort.__version__,
        }

    def load(self, out_dir: Path, cfg: BuildEngineCfg) -> Runner:
        # Already optimised at build time: skip re-optimising on load.
        opts = _options(cfg, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sess = ort.InferenceSession(
            str(out_dir / self.engine_file), opts, providers=["CPUExecutionProvider"]
        )
        return lambda x: sess.run(OUTPUTS, {"images": x})


register(OnnxRuntimeCpu())
