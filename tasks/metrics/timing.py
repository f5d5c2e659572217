"""Latency measurement of several runtimes in one process, fairly.

ONNX Runtime's worker threads keep spinning for a while after each call and slow whatever runs
next, so runtimes are never interleaved call by call: each round shuffles the order, and each
runtime gets a pause, a re-warm and then a timed block. Figures are pooled over rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

PAUSE_S = 0.1


def time_blocks(
    runners: dict[str, Callable[[np.ndarray], object]],
    batch: np.ndarray,
    *,
    warmup: int,
    runs: int,
    rounds: int,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seconds per call for each runner on `batch`: {name: (rounds * runs_per_round,)}."""
    rng = np.random.default_rng(seed)
    per_round = max(1, -(-runs // rounds))
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for _ in tqdm(range(rounds), desc=f"bench batch {batch.shape[0]}", leave=False, disable=None):
        for name in rng.permutation(names):
            fn = runners[name]
            time.sleep(PAUSE_S)
            for _ in range(warmup):
                fn(batch)
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in times.items()}


def latency_stats(seconds: np.ndarray, batch_size: int) -> dict[str, float]:
    ms = seconds * 1e3
    return {
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
        "throughput_ips": float(batch_size / np.median(seconds)),
    }
