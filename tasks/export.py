"""Stage `export`: the distilled model, in eval mode, to ONNX with decoding inside the graph,
compared against PyTorch on test images (`tasks.models.onnx_export.export_checkpoint`, which the
reference stage runs too): `parity_max_abs_diff` (scores and boxes of the detections both
report) is gated by `export.parity_tolerance`. An imported ONNX is prepared instead
(`prepare_imported`: checked, decode + NMS appended).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from tasks.datasets.coco import read_manifest
from tasks.harness.config import ExportCfg
from tasks.harness.errors import GateFailed
from tasks.harness.io import meta, remove, write_json
from tasks.harness.stage import stage_entry
from tasks.models import adapter_for, trains_in_torch
from tasks.models.config import ModelCfg
from tasks.models.onnx_export import export_checkpoint, parity_gap, prepare_imported

log = logging.getLogger(__name__)


def run(
    cfg: ExportCfg,
    *,
    checkpoint: Path,
    manifest: dict,
    out: Path,
    model_cfg: ModelCfg | None = None,
) -> dict:
    """Export the checkpoint to `out` and check parity. Raises GateFailed past the tolerance."""
    result, _, _ = export_checkpoint(checkpoint, manifest, cfg, out, model_cfg)
    log.info(
        "ONNX parity: max |diff| %.2e over %d images",
        result["parity_max_abs_diff"],
        result["parity_images"],
    )
    if gap := parity_gap(result, cfg):
        remove(out)
        raise GateFailed(gap)
    return result


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    checkpoint: Path = typer.Option(Path("artifacts/train/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/export")),
) -> None:
    """Export to ONNX, simplify, check, and gate on parity with PyTorch."""
    with stage_entry("export", params) as ctx:
        cfg = ctx.params.export
        ctx.log_params(cfg)
        for stale in ("model.onnx", "metrics.json", "meta.json"):
            remove(out / stale)
        adapter = adapter_for(ctx.params.model)
        if trains_in_torch(adapter):
            result = run(
                cfg,
                checkpoint=checkpoint,
                manifest=json.loads(manifest.read_text()),
                out=out / "model.onnx",
                model_cfg=ctx.params.model,
            )
        else:  # an imported ONNX: checked, its decode + NMS appended (tasks/models/onnx_import)
            result = prepare_imported(
                adapter,
                out / "model.onnx",
                read_manifest(manifest),
                cfg,
                ctx.params.train.input_size,
            )
            result["parity"] = f"{adapter.skipped}: no PyTorch model to compare with"
        write_json(
            out / "meta.json",
            meta(cfg, {"checkpoint": checkpoint}, ("onnx", "onnxsim", "onnxslim", "onnxruntime")),
        )
        write_json(out / "metrics.json", result)
        ctx.log_metrics(result)
        ctx.log_artifact(out / "model.onnx", "model")


if __name__ == "__main__":
    app()
