"""ONNX Runtime on the CPU execution provider: full graph optimisation, optimised model saved,
and the kernels the convolutions really run (from ORT's profiler) recorded."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tasks.engines import Runner, check_int8, register
from tasks.harness.config import BuildEngineCfg
from tasks.harness.signature import OUTPUTS

INT8_CONV_KERNELS = {"QLinearConv", "ConvInteger"}
CONV_KERNELS = INT8_CONV_KERNELS | {"Conv", "FusedConv", "NchwcConv"}


def _options(cfg: BuildEngineCfg, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def conv_precisions(model: Path, cfg: BuildEngineCfg) -> dict[str, int]:
    """Run the model once under ORT's profiler; count executed conv kernels by precision."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = _options(cfg, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        _, c, h, w = sess.get_inputs()[0].shape
        sess.run(OUTPUTS, {"images": np.zeros((1, c, h, w), np.float32)})
        events = json.loads(Path(sess.end_profiling()).read_text())
    counts: Counter = Counter()
    for e in events:
        op = e.get("args", {}).get("op_name")
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and op in CONV_KERNELS:
            counts["int8" if op in INT8_CONV_KERNELS else "f32"] += 1
    return dict(counts)


class OnnxRuntimeCpu:
    name = "onnxruntime"
    engine_file = "model.ort.onnx"

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        opts = _options(cfg, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.optimized_model_filepath = str(out_dir / self.engine_file)
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        precisions = conv_precisions(out_dir / self.engine_file, cfg)
        check_int8(onnx_path, precisions, self.name)
        return {
            "status": "ok",
            "provider": sess.get_providers()[0],
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "threads": cfg.threads,
            "conv_precisions": precisions,
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
