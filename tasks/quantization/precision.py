"""Numeric precision of ONNX models: read from the graph, and decided reproducibly by timing.

A "precision" label (int8 / fp16 / fp32) is always derived from the graph that was built, never
from the config that asked for it: a model whose layers all fell back to float is fp32 however
it was requested. The keep-faster decision (INT8 vs float, per layer type and for the whole
model) is taken from repeated timing rounds with a noise margin, and recorded with its evidence
under a key of everything it depends on, so the same inputs on the same machine reuse the same
decision instead of re-timing on a loaded CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx

from tasks.harness.io import md5_file, versions, write_json

KEEP_RECORDS = 16  # decisions kept in the record file (newest last)


def conv_precision(path: Path) -> dict[str, str]:
    """Per Conv node of `path`: "int8" when its weight comes from a DequantizeLinear (a QDQ
    convolution), else the weight's float type ("fp16" / "fp32")."""
    graph = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    float16 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    out = {}
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        weight = n.input[1]
        if producers.get(weight) == "DequantizeLinear":
            out[n.name] = "int8"
        elif weight in float16 or producers.get(weight) == "Cast":
            out[n.name] = "fp16"
        else:
            out[n.name] = "fp32"
    return out


def graph_precision(path: Path) -> dict:
    """What `path` computes in: {"precision", "quantize_linear_nodes", "int8_convs", "convs"}.

    `precision` is "int8" when at least one QuantizeLinear node is present, "fp16" when the
    convolutions hold FP16 weights, else "fp32".
    """
    nodes = onnx.load(str(path)).graph.node
    q = sum(n.op_type == "QuantizeLinear" for n in nodes)
    convs = conv_precision(path)
    if q:
        precision = "int8"
    elif convs and all(v == "fp16" for v in convs.values()):
        precision = "fp16"
    else:
        precision = "fp32"
    return {
        "precision": precision,
        "quantize_linear_nodes": q,
        "int8_convs": sum(v == "int8" for v in convs.values()),
        "convs": len(convs),
    }


def faster(candidate: np.ndarray, reference: np.ndarray, rounds: int, margin: float) -> dict:
    """Whether `candidate` is faster than `reference` beyond noise.

    Args:
        candidate, reference: seconds per call, pooled over `rounds` equal timing rounds (as
            `tasks.metrics.timing.time_blocks` returns them).
        rounds: number of rounds the samples were taken in.
        margin: required relative gain (0.05 = 5%).
    Returns:
        {"faster": bool, "candidate_ms", "reference_ms" (medians), "rounds": per-round medians}.
        Faster only when the overall median is below reference * (1 - margin) and every
        round's median is below the reference's in that round: one noisy round keeps the
        reference.
    """
    c_rounds = [float(np.median(r) * 1e3) for r in np.array_split(candidate, rounds)]
    r_rounds = [float(np.median(r) * 1e3) for r in np.array_split(reference, rounds)]
    c_ms, r_ms = float(np.median(candidate) * 1e3), float(np.median(reference) * 1e3)
    wins = all(c < r for c, r in zip(c_rounds, r_rounds, strict=True))
    return {
        "faster": bool(c_ms < r_ms * (1 - margin) and wins),
        "candidate_ms": c_ms,
        "reference_ms": r_ms,
        "rounds": {"candidate_ms": c_rounds, "reference_ms": r_rounds},
    }


def _content_md5(path: Path) -> str:
    """md5 of a file; of a JSON file's content with sorted keys (ONNX Runtime writes the
    calibration ranges in an order that changes from one process to the next)."""
    if path.suffix == ".json":
        canonical = json.dumps(json.loads(path.read_text()), sort_keys=True)
        return hashlib.md5(canonical.encode()).hexdigest()
    return md5_file(path)


def decision_key(**inputs) -> str:
    """md5 over the decision's inputs (files by their content) and this machine and runtime."""
    facts = {k: _content_md5(v) if isinstance(v, Path) else v for k, v in sorted(inputs.items())}
    facts["machine"] = [platform.machine(), platform.processor(), os.cpu_count()]
    facts["versions"] = versions("onnxruntime", "onnx")
    return hashlib.md5(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def recorded(path: Path, key: str) -> dict | None:
    """The decision recorded under `key` in `path` (None when absent or unreadable)."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    entry = records.get(key) if isinstance(records, dict) else None
    return entry if isinstance(entry, dict) else None


def record(path: Path, key: str, decision: dict) -> None:
    """Store `decision` under `key` in `path` (atomically), keeping the newest KEEP_RECORDS."""
    try:
        records = json.loads(Path(path).read_text())
        records = records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        records = {}
    records.pop(key, None)
    records[key] = decision
    write_json(path, dict(list(records.items())[-KEEP_RECORDS:]))
