"""Stage `export`: the distilled model, in eval mode, to ONNX with decoding inside the graph
(tasks/models/onnx_export.py), compared against PyTorch on test images: `parity_max_abs_diff`
(scores
and boxes of the detections both report) is gated by `export.parity_tolerance`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from tasks.datasets.coco import DetectionSet, read_manifest
from tasks.harness.config import ExportCfg
from tasks.harness.errors import GateFailed
from tasks.harness.io import meta, remove, write_json
from tasks.harness.stage import stage_entry
from tasks.models import adapter_for, load_checkpoint, trains_in_torch
from tasks.models.config import ModelCfg
from tasks.models.onnx_export import parity, to_onnx

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
    adapter, model, _ = load_checkpoint(checkpoint, model_cfg)
    # The exporter warns about every torchvision op it cannot find; this model uses none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    facts = to_onnx(adapter, model, cfg, out)
    test = DetectionSet(manifest, "test", adapter.input_size(model))
    images = test.batch(slice(0, cfg.parity_images))
    result = {**facts, **parity(adapter, model, out, images, cfg)}
    log.info(
        "ONNX parity: max |diff| %.2e over %d images",
        result["parity_max_abs_diff"],
        result["parity_images"],
    )
    if result["parity_max_abs_diff"] > cfg.parity_tolerance:
        remove(out)
        raise GateFailed(
            f"ONNX parity: max |onnx - torch| = {result['parity_max_abs_diff']:.3g} exceeds "
            f"export.parity_tolerance={cfg.parity_tolerance:g}"
        )
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
            categories = read_manifest(manifest)["splits"]["train"]["categories"]
            result = adapter.prepare(
                out / "model.onnx",
                num_classes=len(categories),
                input_size=ctx.params.train.input_size,
                max_detections=cfg.max_detections,
                score_floor=cfg.score_floor,
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
