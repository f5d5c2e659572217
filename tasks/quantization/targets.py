"""The quantize stage's per-target models: one model per distinct INT8 need of the
build_engine targets (tasks/engines/int8.py), written to `targets/<target>/`.

The deployable model.onnx serves the targets of the first QDQ type; another QDQ type gets its
own accuracy-aware run of the stage's build (passed in as `build`: this module does not import
the stage); LiteRT gets its full-integer .tflite. `quantize.method` (tasks/quantization/method.py)
swaps in NNCF's QDQ model per target, or keeps the better of the two on the target's engine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.engines.int8 import LITERT, qdq_types, requirement
from tasks.harness.config import QuantizeCfg
from tasks.harness.io import atomic_dir, copy_file, remove
from tasks.quantization.litert_int8 import litert_model
from tasks.quantization.method import pick_best, target_methods
from tasks.quantization.nncf_peers import onnx_int8
from tasks.quantization.precision import graph_precision
from tasks.quantization.qdq import calibration_set

Build = Callable[..., dict]  # the stage's run(cfg, *, out, **inputs) -> its report


def qdq_model(cfg: QuantizeCfg, activation_type: str, dst: Path, *, build: Build, **inputs) -> dict:
    """The accuracy-aware INT8 QDQ model with `activation_type` activations, written to `dst`
    by `build` (the stage's run; `inputs`: its keyword arguments but `out`). keep_faster and
    the calibrator comparison are off: they measure on ONNX Runtime CPU, which is not where
    this model runs."""
    sub = cfg.model_copy(
        update={
            "activation_type": activation_type,
            "keep_faster": False,
            "compare_calibrators": False,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = build(sub, out=Path(tmp), **inputs)
        copy_file(Path(tmp) / "model.onnx", dst)
    return {
        "model": f"QDQ, {activation_type} activations, symmetric={activation_type == 'qint8'}",
        "precision": report["precision"],
        "val_map50_int8": report["val_map50"]["int8"],
        "int8_map_drop": report["int8_map_drop"],
        "layers_kept_float": [k for k, v in report["layer_precision"].items() if v == "fp32"],
    }


def target_models(
    cfg: QuantizeCfg,
    targets: list[str],
    report: dict,
    out: Path,
    build_cfg=None,
    *,
    build: Build,
    **inputs,
) -> dict[str, dict]:
    """Write `out/targets/<target>/` for each target: `model.onnx` (the model made for its INT8
    need; LiteRT: the float source) and, for LiteRT, `model.tflite`. Returns per-target facts.
    `report` is `build`'s (the stage's run) for the deployable model.onnx (in `out`); `inputs`
    are its inputs; a QDQ type the deployable model does not serve is built by `build` again.
    `quantize.method` (see `target_methods`) swaps in NNCF's QDQ model (`nncf`), or the better
    of the two on the target's engine (`best`, built with `build_cfg`: build_engine's)."""
    methods = target_methods(cfg, targets)
    types = qdq_types(cfg.activation_type, targets)
    made = {types[0]: out / "model.onnx"}
    facts: dict[str, dict] = {}
    nncf_need = {
        t
        for t, m in methods.items()
        if m != "ort" and requirement(t, cfg.activation_type) == "quint8"
    }
    with atomic_dir(out / "targets") as tmp:
        if nncf_need:
            src = inputs["qat_onnx"] or inputs["onnx_path"]
            images, _, _ = calibration_set(cfg, inputs["train"])
            made["nncf"] = tmp / "model.nncf.onnx"
            facts["nncf"] = onnx_int8(
                src, images, inputs["val"], cfg, inputs["threads"], made["nncf"]
            )
            facts["nncf"] |= {
                "precision": graph_precision(made["nncf"])["precision"],
                "val_map50_int8": facts["nncf"]["val_map50"],
                "int8_map_drop": facts["nncf"]["val_map50_drop"],
            }
        for target in targets:
            need = requirement(target, cfg.activation_type)
            folder = tmp / target
            folder.mkdir()
            if need == LITERT:
                src = inputs["qat_onnx"] or inputs["onnx_path"]
                copy_file(src, folder / "model.onnx")
                facts[target] = litert_model(
                    cfg,
                    src,
                    folder / "model.tflite",
                    inputs["train"],
                    inputs["val"],
                    report["val_map50"]["fp32"],
                )
                continue
            if need not in made and cfg.precision == "int8":
                made[need] = tmp / f"model.{need}.onnx"
                facts[f"qdq_{need}"] = qdq_model(cfg, need, made[need], build=build, **inputs)
            ours = made.get(need, made[types[0]])
            own = facts.get(f"qdq_{need}", report)  # the run that made this target's model
            facts[target] = {
                "model": f"qdq_{need}",
                "activation_type": need,
                "precision": own["precision"],
                "method": "ort",
                "reason": "quantize.method: ort",
            }
            if target in nncf_need and methods[target] == "nncf":
                facts[target] |= {
                    "model": "nncf",
                    "precision": facts["nncf"]["precision"],
                    "method": "nncf",
                    "reason": "quantize.method: nncf",
                }
            elif target in nncf_need:  # best
                best = pick_best(
                    cfg,
                    target,
                    {"ort": ours, "nncf": made["nncf"]},
                    inputs["val"],
                    report["val_map50"]["fp32"],
                    build_cfg,
                    tmp / ".best",
                )
                facts[target]["best"] = best
                facts[target]["reason"] = best["reason"]
                if best["chosen"] == "nncf":
                    facts[target] |= {
                        "model": "nncf",
                        "precision": facts["nncf"]["precision"],
                        "method": "nncf",
                    }
            elif methods[target] == "best":
                facts[target]["reason"] = f"best: NNCF makes no {need} model: ort"
            copy_file(made["nncf"] if facts[target]["method"] == "nncf" else ours,
                      folder / "model.onnx")  # fmt: skip
        for extra in tmp.glob("model.*.onnx"):
            extra.unlink()
        remove(tmp / ".best")
    return facts
