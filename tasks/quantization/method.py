"""`quantize.method` per target: which quantizer makes each engine target's INT8 model.

`ort` is the project's own ONNX Runtime QDQ quantizer; `nncf` is NNCF's ONNX backend (a QDQ ONNX
with uint8 activations, so only for targets built from a quint8 QDQ model: ONNX Runtime and
OpenVINO; tasks/quantization/nncf_peers.py makes it); `best` builds both on the target's own
engine and keeps the one with the higher val mAP@0.5 (ties: the faster there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import QuantizeCfg
from tasks.harness.errors import ConfigError, GateFailed
from tasks.metrics.detection import coco_map, predict
from tasks.metrics.timing import time_blocks


def target_methods(cfg: QuantizeCfg, targets: list[str]) -> dict[str, str]:
    """`quantize.method` per target ({target: ort | nncf | best}; a target a mapping leaves out
    gets ort). Raises ConfigError where NNCF cannot make a target's model: NNCF's QDQ has uint8
    activations, so it serves only targets built from a quint8 QDQ model (ONNX Runtime,
    OpenVINO), and only when the engines are INT8."""
    from tasks.engines.int8 import requirement

    given = cfg.method
    methods = {t: given for t in targets} if isinstance(given, str) else dict(given)
    if unknown := sorted(set(methods) - set(targets)):
        raise ConfigError(
            f"params.yaml: quantize.method: names {', '.join(unknown)}, which "
            f"build_engine.targets ({', '.join(targets)}) does not build"
        )
    methods = {t: methods.get(t, "ort") for t in targets}
    asked = [t for t, m in methods.items() if m != "ort"]
    if asked and cfg.precision != "int8":
        raise ConfigError(
            f"params.yaml: quantize.method: {methods[asked[0]]} for {asked[0]} makes an INT8 "
            f"model, but quantize.precision is {cfg.precision}: expected ort"
        )
    for target in [t for t, m in methods.items() if m == "nncf"]:
        if (need := requirement(target, cfg.activation_type)) != "quint8":
            raise ConfigError(
                f"params.yaml: quantize.method: nncf cannot make {target}'s model (it needs "
                f"{'a full-integer .tflite' if need == 'litert' else f'{need} QDQ activations'}; "
                "NNCF's QDQ has uint8 activations): expected ort or best for it, e.g. "
                "method: {openvino: nncf}"
            )
    return methods


def on_target(target: str, model: Path, folder: Path, build_cfg) -> tuple[dict, object]:
    """Build `model` on `target`'s engine into `folder`: (build facts, loaded runner)."""
    from tasks.engines import get

    engine = get(target)
    folder.mkdir(parents=True)
    facts = engine.build(model, folder, build_cfg)
    return facts, engine.load(folder, build_cfg) if facts["status"] == "ok" else None


def pick_best(
    cfg: QuantizeCfg,
    target: str,
    candidates: dict[str, Path],
    val: DetectionSet,
    fp32_map: float,
    build_cfg,
    work: Path,
) -> dict:
    """`method: best` for one target: build each candidate ({method: QDQ ONNX}) on the
    target's engine, score it on the val split (mAP@0.5) and time it at batch 1 (in-process,
    shuffled alternating blocks, `keep_faster_rounds` rounds). Keeps the higher val mAP among
    the candidates within `max_map_drop` of FP32 (all, when none is); a difference up to
    `best_map_tie` is a tie, won by the lower median latency. A candidate other than ort that
    the engine refuses (GateFailed: e.g. ONNX Runtime runs none of the convs of NNCF's QDQ YOLO
    in INT8) is left out, recorded under `refused`, and ort kept. Returns the choice, the
    candidates' figures and the reason."""
    runners, scored, refused = {}, {}, {}
    for name, path in candidates.items():
        try:
            facts, run_ = on_target(target, path, work / f"{target}-{name}", build_cfg)
        except GateFailed as e:  # e.g. the engine runs no conv of NNCF's QDQ in INT8 (YOLO, ORT)
            if name == "ort":
                raise
            refused[name] = str(e)
            continue
        if run_ is None:
            return {"chosen": "ort", "reason": f"{target} engine: {facts['status']}"}
        runners[name] = run_
        scored[name] = {"val_map50": coco_map(val.coco, predict(run_, val))["map50"]}
    rounds = cfg.keep_faster_rounds
    times = time_blocks(runners, val.batch(slice(0, 1)), warmup=10, runs=30 * rounds, rounds=rounds)
    for name, t in times.items():
        scored[name]["latency_ms_p50"] = float(np.median(t) * 1e3)
    if refused:  # only ort is left
        why = "; ".join(f"{n} refused by the {target} engine ({e})" for n, e in refused.items())
        return {"chosen": "ort", "candidates": scored, "refused": refused, "reason": why}
    within = [n for n in scored if fp32_map - scored[n]["val_map50"] <= cfg.max_map_drop + 1e-9]
    pool = within or list(scored)
    top = max(scored[n]["val_map50"] for n in pool)
    tied = [n for n in pool if top - scored[n]["val_map50"] <= cfg.best_map_tie + 1e-12]
    chosen = min(tied, key=lambda n: scored[n]["latency_ms_p50"])
    other = [n for n in scored if n != chosen]
    figures = ", ".join(
        f"{n} {scored[n]['val_map50']:.4f} / {scored[n]['latency_ms_p50']:.3f} ms" for n in scored
    )
    if not within:
        why = f"neither within max_map_drop {cfg.max_map_drop} of fp32 {fp32_map:.4f}: higher mAP"
    elif len(tied) > 1:
        why = f"val mAP tied (within best_map_tie {cfg.best_map_tie}): faster on {target}"
    elif other and other[0] not in within:
        why = f"{other[0]} loses more than max_map_drop {cfg.max_map_drop}"
    else:
        why = "higher val mAP@0.5"
    return {
        "chosen": chosen,
        "candidates": scored,
        "reason": f"best on {target} (val mAP@0.5 / batch-1 ms: {figures}): {chosen}, {why}",
    }
