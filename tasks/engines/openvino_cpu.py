"""OpenVINO on the CPU: ONNX -> IR (xml + bin), compiled with explicit precision and
performance hints; the precision each convolution really executes in is read back from the
compiled model's runtime info."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tasks.engines import Runner, check_int8, register
from tasks.harness.config import BuildEngineCfg


def _config(cfg: BuildEngineCfg) -> dict:
    return {
        "INFERENCE_PRECISION_HINT": cfg.openvino_precision,
        "PERFORMANCE_HINT": cfg.openvino_performance_hint,
        "INFERENCE_NUM_THREADS": cfg.threads,
    }


def conv_precisions(compiled) -> dict[str, int]:
    """Convolutions of a compiled model counted by their runtime precision (e.g. {'u8': 14})."""
    counts: Counter = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            counts[info["runtimePrecision"].astype(str)] += 1
    return dict(counts)


class OpenVinoCpu:
    name = "openvino"
    engine_file = "model.xml"

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        try:
            import openvino as ov
        except ImportError as e:
            return {"status": f"skipped: openvino not installed ({e})"}
        model = ov.convert_model(str(onnx_path))
        ov.save_model(
            model, str(out_dir / self.engine_file), compress_to_fp16=cfg.openvino_fp16_weights
        )
        compiled = ov.Core().compile_model(model, "CPU", _config(cfg))
        precisions = conv_precisions(compiled)
        check_int8(onnx_path, precisions, self.name)
        return {
            "status": "ok",
            "device": "CPU",
            **{k.lower(): str(v) for k, v in _config(cfg).items()},
            "inference_precision_used": compiled.get_property(
                "INFERENCE_PRECISION_HINT"
            ).get_type_name(),
            "fp16_weights": cfg.openvino_fp16_weights,
            "conv_precisions": precisions,
            "openvino": ov.__version__,
        }

    def load(self, out_dir: Path, cfg: BuildEngineCfg) -> Runner:
        import openvino as ov

        compiled = ov.Core().compile_model(str(out_dir / self.engine_file), "CPU", _config(cfg))
        request = compiled.create_infer_request()
        outputs = compiled.outputs

        def run(x):
            result = request.infer({0: x})
            return [result[o] for o in outputs]

        return run


register(OpenVinoCpu())
