"""TensorRT on an NVIDIA GPU, written to TensorRT 10's documented Python API.

Build: parse the ONNX, FP16 allowed by flag, INT8 by explicit quantization (the symmetric s8
QDQ model `quantize` makes for this target, see tasks/engines/int8.py), one optimization
profile for the dynamic batch (min/opt/max from params), a workspace limit, and a timing cache
kept beside the engine between builds. The engine is saved with a JSON of its build settings
and the TensorRT/CUDA/GPU versions it is valid for, plus the equivalent `trtexec` command line
for building it on the target device (e.g. a Jetson).

Without the `tensorrt` package (the `tensorrt` extra) or a CUDA device the target reports
`skipped: <reason>`; it never falls back silently.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tasks.engines import Runner, is_quantized, register
from tasks.harness.config import BuildEngineCfg
from tasks.harness.signature import OUTPUTS

TIMING_CACHE = Path(".cache/tensorrt/timing.cache")  # shared by builds on this machine


def unavailable() -> str | None:
    """Why TensorRT cannot build here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"skipped: tensorrt not importable ({e}); pip install '.[tensorrt]'"
    return None


def trtexec_command(
    onnx_path: Path, engine_path: Path, cfg: BuildEngineCfg, int8: bool, shape: tuple[int, ...]
) -> str:
    """The trtexec line that builds the same engine; `shape` is the input's (C, H, W)."""
    lo, opt, hi = cfg.tensorrt_batch
    chw = "x".join(str(d) for d in shape)
    args = [
        "trtexec",
        f"--onnx={onnx_path.name}",
        f"--saveEngine={engine_path.name}",
        f"--minShapes=images:{lo}x{chw}",
        f"--optShapes=images:{opt}x{chw}",
        f"--maxShapes=images:{hi}x{chw}",
        f"--memPoolSize=workspace:{cfg.tensorrt_workspace_mb}M",
        f"--timingCacheFile={TIMING_CACHE.name}",
    ]
    if cfg.tensorrt_precision == "fp16":
        args.append("--fp16")
    if int8:
        args.append("--int8")
    return shlex.join(args)


class TensorRtGpu:
    name = "tensorrt"
    engine_file = "model.engine"

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        if reason := unavailable():
            return {"status": reason}
        import tensorrt as trt
        import torch

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.tensorrt_workspace_mb << 20)
        if cfg.tensorrt_precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        int8 = is_quantized(onnx_path)
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales from QDQ
        shape = tuple(network.get_input(0).shape)[1:]  # (3, H, W)
        lo, opt, hi = cfg.tensorrt_batch
        profile = builder.create_optimization_profile()
        profile.set_shape("images", (lo, *shape), (opt, *shape), (hi, *shape))
        config.add_optimization_profile(profile)
        TIMING_CACHE.parent.mkdir(parents=True, exist_ok=True)
        cached = TIMING_CACHE.read_bytes() if TIMING_CACHE.exists() else b""
        timing = config.create_timing_cache(cached)
        config.set_timing_cache(timing, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
        (out_dir / self.engine_file).write_bytes(bytes(serialized))
        TIMING_CACHE.write_bytes(bytes(config.get_timing_cache().serialize()))
        return {
            "status": "ok",
            "precision": ("int8+" if int8 else "") + cfg.tensorrt_precision,
            "batch_profile": list(cfg.tensorrt_batch),
            "workspace_mb": cfg.tensorrt_workspace_mb,
            "tensorrt": trt.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "trtexec": trtexec_command(onnx_path, out_dir / self.engine_file, cfg, int8, shape),
        }

    def load(self, out_dir: Path, cfg: BuildEngineCfg) -> Runner:
        import tensorrt as trt
        import torch

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((out_dir / self.engine_file).read_bytes())
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        stream = torch.cuda.Stream()

        def run(x):
            inp = torch.from_numpy(x).cuda()
            context.set_input_shape("images", tuple(inp.shape))
            context.set_tensor_address("images", inp.data_ptr())
            bufs = {}
            for name in outputs:
                dtype = torch.int32 if engine.get_tensor_dtype(name) == trt.int32 else torch.float32
                bufs[name] = torch.empty(
                    tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda"
                )
                context.set_tensor_address(name, bufs[name].data_ptr())
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return [bufs[n].cpu().numpy() for n in OUTPUTS]

        return run


register(TensorRtGpu())
