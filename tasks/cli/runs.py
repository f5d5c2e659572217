"""What two benchmark commands measure that no stage does: the whole pipeline's wall time from a
fresh project copy (`shrinkflow bench-pipeline`) and the input cache's memory on synthetic JPEGs
(`shrinkflow bench-input-cache`). The commands (tasks/cli/app.py) write the results to files."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

from tasks.harness.errors import ShrinkflowError
from tasks.harness.project import copy_project, dvc, profile_params


def timed_repro(proj: Path, env: dict) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    proc = dvc(proj, "repro", env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise ShrinkflowError(f"dvc repro failed in {proj}:\n{proc.stdout[-3000:]}{proc.stderr}")
    return wall, re.findall(r"Running stage '([^']+)'", proc.stdout)


def stage_seconds(uri: str, experiment: str) -> dict[str, float]:
    """{stage: wall seconds} of the stage runs in an MLflow store (its start to end time)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], "tags.`shrinkflow.stage` != ''")
    return {
        r.data.tags["shrinkflow.stage"]: (r.info.end_time - r.info.start_time) / 1000
        for r in sorted(runs, key=lambda r: r.info.start_time)
        if r.info.end_time
    }


def pipeline_benchmark(profile: str, work: Path) -> dict:
    """Time a cold and a no-op `dvc repro` of a fresh project copy under `work`, with each
    stage's wall time from its MLflow run."""
    params = profile_params(profile)
    proj = copy_project(work / "proj", params)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    cold_s, stages = timed_repro(proj, env)
    noop_s, rerun = timed_repro(proj, env)
    per_stage = stage_seconds(uri, params["project"]["mlflow_experiment"])
    stage_metrics = {
        p.parent.relative_to(proj / "artifacts").as_posix(): json.loads(p.read_text())
        for p in sorted((proj / "artifacts").rglob("metrics.json"))
    }
    return {
        "profile": profile,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "dvc_repro_cold_s": cold_s,
        "dvc_repro_noop_s": noop_s,
        "stage_s": per_stage,
        "stages_run": stages,
        "stages_rerun_on_noop": rerun,
        "kpis": stage_metrics,
    }


def input_cache_benchmark(
    n: int, width: int, height: int, input_size: int, batch: int, work: Path
) -> dict:
    """Write `n` synthetic `width`x`height` JPEGs under `work`, then measure the input cache on
    them at `input_size` in a fresh process (tasks/cli/input_cache_probe.py, which imports only
    the cache and the decoder, so its memory is the cache's)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image, ImageDraw

    root, cache = work / "images", work / "cache"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        im = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
            x1 = int(rng.integers(x0 + 4, width))
            y1 = int(rng.integers(y0 + 4, height))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        names.append(f"{i:06d}.jpg")
        im.save(root / names[-1], quality=90)
    probe = [sys.executable, "-m", "tasks.cli.input_cache_probe"]
    here = str(Path(__file__).resolve().parents[2])  # this checkout's `tasks`, not another's
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [*probe, str(root), str(input_size), str(cache), str(batch)],
        input="\n".join(names),
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ShrinkflowError(f"bench-input-cache: the probe process failed:\n{done.stderr}")
    probed = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "images": n,
        "image_wh": [width, height],
        "input_size": input_size,
        "batch": batch,
        "jpeg_mb": sum(f.stat().st_size for f in root.iterdir()) / 2**20,
        "cache_file_mb": sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**20,
        "native_uint8_mb": n * width * height * 3 / 2**20,  # the set held in RAM, decoded
        **probed,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
