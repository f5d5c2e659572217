"""Stage `build_engine@<target>`: one deployable engine per target from the exported ONNX.

The target is looked up in the engine registry (`tasks/engines`). A target that cannot run here
(missing runtime or device) writes `status: skipped: <reason>` instead of failing the run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from tasks.engines import engine_size_mb, get
from tasks.harness.config import BuildEngineCfg
from tasks.harness.io import atomic_dir, check_onnx, meta, remove, write_json
from tasks.harness.stage import stage_entry

log = logging.getLogger(__name__)


def run(cfg: BuildEngineCfg, *, target: str, onnx_path: Path, out: Path) -> dict:
    """Build `target` from `onnx_path` into the folder `out` (atomically). Returns metrics."""
    engine = get(target)
    check_onnx(onnx_path)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        facts = engine.build(onnx_path, tmp, cfg)
        size = engine_size_mb(tmp) if facts["status"] == "ok" else 0.0
        write_json(
            tmp / "engine.json", {"target": target, "engine_file": engine.engine_file, **facts}
        )
    return {"target": target, **facts, "build_s": time.perf_counter() - t0, "size_mb": size}


app = typer.Typer(add_completion=False)


@app.command()
def main(
    target: str = typer.Option(..., help="engine target, e.g. onnxruntime"),
    params: Path = typer.Option(Path("params.yaml")),
    onnx_path: Path = typer.Option(Path("artifacts/export/model.onnx"), "--onnx"),
    out: Path = typer.Option(..., help="engine folder, e.g. artifacts/build_engine/<target>"),
) -> None:
    """Build one engine target."""
    with stage_entry(f"build_engine@{target}", params) as ctx:
        cfg = ctx.params.build_engine
        ctx.log_params({**cfg.model_dump(mode="json"), "target": target})
        remove(out / "metrics.json")
        result = run(cfg, target=target, onnx_path=onnx_path, out=out / "engine")
        write_json(
            out / "meta.json",
            meta(
                cfg,
                {"source": onnx_path.parent},  # the model quantize made for this target
                ("onnxruntime", "openvino", "tensorrt", "ai-edge-litert", "onnx2tf", "tensorflow"),
            ),
        )
        write_json(out / "metrics.json", result)
        ctx.log_metrics(result)
        log.info("%s: %s (%.1f s)", target, result["status"], result["build_s"])


if __name__ == "__main__":
    app()
