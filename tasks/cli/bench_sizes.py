"""Latency of the uncompressed and the compressed model at several input sizes, in one process.

The pipeline measures latency at the trained input size (128 px by default). There, a batch-1
call of the compressed model is bound by fixed per-call and per-op cost, not by its MACs, so
pruning and INT8 buy less than their MACs suggest. This benchmark rebuilds the *same weights* at
each size (the detector is fully convolutional), quantizes the compressed model with the
quantize stage's own settings and calibration images, builds every CPU engine, and times:

- `eager_fp32`: the trained model in PyTorch eager,
- `<runtime>_fp32`: the trained model on each runtime (OpenVINO with the f32 hint),
- `openvino_bf16`: the trained model with OpenVINO's default on this CPU (what a user gets with
  no pipeline),
- `<runtime>_compressed`: the deployed (pruned + distilled) model in the precision and by the
  method (ONNX Runtime's quantizer or NNCF, `quantize.method`) the quantize stage chose for
  that runtime.

Only latency is measured here: accuracy at a size the model was not trained for means nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from tasks.datasets.coco import DetectionSet
from tasks.engines import get
from tasks.evaluate import eager_runner
from tasks.harness.config import InputSize, Params, stride_problem
from tasks.harness.errors import ConfigError
from tasks.metrics.timing import latency_stats, time_blocks
from tasks.models import ModelAdapter, load_checkpoint
from tasks.models.onnx_export import to_onnx
from tasks.preprocess.letterbox import build_size
from tasks.quantization.nncf_peers import onnx_int8
from tasks.quantization.qdq import calibrate, calibration_set, to_fp16, to_int8

CPU_TARGETS = ("onnxruntime", "openvino")
Size = int | tuple[int, int]


def input_sizes(sizes: list, params: Params) -> list[tuple[int, int]]:
    """Each of `sizes` (a side, [w, h], or the text `128` / `96x64`) as (width, height), checked
    as `train.input_size` is: the same type and the model family's stride.

    Raises:
        ConfigError: a size that is not one side or two, or does not fit the family's stride.
    """
    out = []
    for given in sizes:
        try:
            value = given
            if isinstance(given, str):
                parts = [int(p) for p in given.lower().replace(",", "x").split("x")]
                value = parts[0] if len(parts) == 1 else parts
            wh = TypeAdapter(InputSize).validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"bench-sizes: --size {given}: {first}") from None
        except ValueError:
            raise ConfigError(
                f"bench-sizes: --size {given}: expected a side (128) or WIDTHxHEIGHT (96x64)"
            ) from None
        model = params.model
        if problem := stride_problem("--size", wh, model.input_stride, model.family):
            raise ConfigError(f"bench-sizes: {problem}")
        out.append(wh)
    return out


def size_key(size: tuple[int, int]) -> str:
    """The result table's key of a size: `128` for a square, `96x64` (width x height) else."""
    w, h = size
    return str(w) if w == h else f"{w}x{h}"


def at_size(loaded: tuple, path: Path, size: Size) -> tuple[ModelAdapter, torch.nn.Module]:
    """The same weights rebuilt for inputs of `size` (a side, or (width, height); `loaded`:
    load_checkpoint's result; every family keeps its input size in the checkpoint's
    `config.input_size`: one side for a square, else [w, h])."""
    adapter, _, ckpt = loaded
    side = build_size(size)
    stored = side if isinstance(side, int) else list(side)
    resized = {**ckpt, "config": {**ckpt["config"], "input_size": stored}}
    return adapter, adapter.load(resized, path)


def _int8(
    method: str, src: Path, images, params: Params, report: dict, manifest: dict, size: Size,
    dst: Path,
) -> None:  # fmt: skip
    """`src` to INT8 at `dst` as the quantize stage made it with `method`: NNCF's PTQ (with its
    accuracy control where quantize's report says it ran), or ONNX Runtime's quantizer with
    the calibrator and the float layers quantize chose."""
    cfg = params.quantize
    if method == "nncf":
        made_by = report.get("targets", {}).get("nncf", {}).get("made_by", "")
        controlled = "quantize_with_accuracy_control" in made_by
        as_made = cfg.model_copy(update={"accuracy_aware": controlled})
        val = DetectionSet(manifest, "val", size)
        onnx_int8(src, images, val, as_made, params.build_engine.threads, dst)
        return
    cache = dst.with_suffix(".ranges.json")
    calibrate(src, images, cfg, cfg.calibrator, cache)
    float_layers = [k for k, v in report.get("layer_precision", {}).items() if v == "fp32"]
    to_int8(src, dst, cache, cfg, cfg.calibrator, exclude=float_layers or None)


def _deployable(
    resized: tuple, params: Params, report: dict, methods: dict[str, str], manifest: dict,
    size: Size, tmp: Path,
) -> dict[str, Path]:  # fmt: skip
    """The compressed model at `size` per CPU target, as the quantize stage made it for that
    target (its `report.json`): the precision, and for INT8 the `methods` (target -> ort |
    nncf); one model per method."""
    onnx_path = tmp / "compressed.onnx"
    to_onnx(*resized, params.export, onnx_path)
    precision = report["precision"]
    if precision == "fp32":
        return dict.fromkeys(CPU_TARGETS, onnx_path)
    if precision == "fp16":
        to_fp16(onnx_path, tmp / "compressed.fp16.onnx")
        return dict.fromkeys(CPU_TARGETS, tmp / "compressed.fp16.onnx")
    images, _, _ = calibration_set(params.quantize, DetectionSet(manifest, "train", size))
    made = {m: tmp / f"compressed.int8.{m}.onnx" for m in sorted(set(methods.values()))}
    for method, dst in made.items():
        _int8(method, onnx_path, images, params, report, manifest, size, dst)
    return {target: made[method] for target, method in methods.items()}


def _runners(params: Params, trained: tuple, compressed: dict[str, Path], tmp: Path) -> dict:
    fp32 = tmp / "trained.onnx"
    to_onnx(*trained, params.export, fp32)
    engine_cfg = params.build_engine
    variants = {
        "onnxruntime_fp32": ("onnxruntime", fp32, engine_cfg),
        "openvino_fp32": (
            "openvino",
            fp32,
            engine_cfg.model_copy(update={"openvino_precision": "f32"}),
        ),
        "openvino_bf16": (
            "openvino",
            fp32,
            engine_cfg.model_copy(update={"openvino_precision": "bf16"}),
        ),
        **{f"{t}_compressed": (t, compressed[t], engine_cfg) for t in CPU_TARGETS},
    }
    runners = {"eager_fp32": eager_runner(*trained, params.export)}
    for name, (target, onnx_path, cfg) in variants.items():
        folder = tmp / name
        folder.mkdir()
        get(target).build(onnx_path, folder, cfg)
        runners[name] = get(target).load(folder, cfg)
    return runners


def ratios(p50: dict[str, float]) -> dict[str, float]:
    """The budget ratios from one size's p50 latencies (higher = the compressed model wins)."""
    out = {}
    for t in CPU_TARGETS:
        c = p50[f"{t}_compressed"]
        out[f"{t}_compressed_vs_eager"] = p50["eager_fp32"] / c
        out[f"{t}_compressed_vs_fp32_same_runtime"] = p50[f"{t}_fp32"] / c
    out["openvino_compressed_vs_openvino_bf16"] = p50["openvino_bf16"] / p50["openvino_compressed"]
    out["openvino_f32_vs_onnxruntime_fp32"] = p50["openvino_fp32"] / p50["onnxruntime_fp32"]
    return out


def run(
    params: Params,
    *,
    trained: Path,
    compressed: Path,
    quantize_report: Path,
    manifest: Path,
    sizes: list,
    runs: int,
    rounds: int,
) -> dict:
    """Time every variant at every size (see module docstring); returns the result table,
    keyed by `size_key`. `sizes`: each a side or [width, height] (see `input_sizes`).

    Raises:
        ConfigError: a size does not fit the model family (see `input_sizes`).
    """
    checked = input_sizes(sizes, params)
    torch.set_num_threads(params.build_engine.threads)
    trained_model = load_checkpoint(trained, params.model)
    compressed_model = load_checkpoint(compressed, params.model)
    report = json.loads(quantize_report.read_text())
    methods = {t: report.get("targets", {}).get(t, {}).get("method", "ort") for t in CPU_TARGETS}
    manifest_obj = json.loads(manifest.read_text())
    result: dict = {
        "threads": params.build_engine.threads,
        "batch": 1,
        "runs": runs,
        "rounds": rounds,
        "precision": report["precision"],
        "methods": methods,
        "sizes": {},
    }
    for size in checked:
        with tempfile.TemporaryDirectory(prefix="shrinkflow-bench-sizes-") as tmp:
            tmp = Path(tmp)
            deploy = _deployable(
                at_size(compressed_model, compressed, size), params, report, methods,
                manifest_obj, size, tmp,
            )  # fmt: skip
            runners = _runners(params, at_size(trained_model, trained, size), deploy, tmp)
            x = DetectionSet(manifest_obj, "test", size).batch(slice(0, 1))
            with torch.inference_mode():
                times = time_blocks(runners, x, warmup=10, runs=runs, rounds=rounds)
        stats = {k: latency_stats(v, 1) for k, v in times.items()}
        p50 = {k: v["latency_ms_p50"] for k, v in stats.items()}
        result["sizes"][size_key(size)] = {"latency": stats, "ratios": ratios(p50)}
    return result


def show(result: dict) -> None:
    """Print `run`'s result as a table: p50 per variant and size, then the ratios."""
    table = Table(title=f"batch 1, {result['threads']} threads, p50 ms")
    table.add_column("variant", no_wrap=True)
    for s in result["sizes"]:
        table.add_column(f"{s} px")
    variants = next(iter(result["sizes"].values()))
    for name in variants["latency"]:
        cells = [f"{v['latency'][name]['latency_ms_p50']:.3f}" for v in result["sizes"].values()]
        table.add_row(name, *cells)
    for name in variants["ratios"]:
        table.add_row(name, *[f"{v['ratios'][name]:.2f}x" for v in result["sizes"].values()])
    Console().print(table)
