"""Stage `reference`: the uncompressed FP32 model as ONNX, once per `dvc repro`.

`artifacts/reference/model.onnx` is what a user gets with no pipeline: the trained model
(`artifacts/train/model.pt`) exported with the same decode as the deployed graph
(tasks/models/onnx_export.py), or, for an imported ONNX (`model.family: onnx`), the imported graph
prepared as the export stage prepares it (checked, decode + NMS appended). `evaluate@<target>`
builds it for its own runtime as the `fp32_uncompressed` row; `reference.json` records what
evaluate reports for it (MACs, parameters, the uncompressed file's size) so no later stage
re-exports or re-counts the trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from tasks.datasets.coco import DetectionSet, read_manifest
from tasks.harness.config import ExportCfg
from tasks.harness.io import md5_file, meta, remove, write_json
from tasks.harness.stage import stage_entry
from tasks.models import adapter_for, load_checkpoint, trains_in_torch
from tasks.models.config import ModelCfg
from tasks.models.onnx_export import parity, to_onnx
from tasks.models.reference_graph import FACTS, ONNX

log = logging.getLogger(__name__)


def run(
    cfg: ExportCfg,
    *,
    checkpoint: Path,
    manifest: dict,
    out: Path,
    model_cfg: ModelCfg | None = None,
    input_size: int = 128,
) -> dict:
    """Write the FP32 reference graph `out/model.onnx` and its facts `out/reference.json`.

    `checkpoint` is the trained, uncompressed model. For an imported ONNX there is no PyTorch
    model: the reference is the imported file at `input_size`, and `checkpoint` (the train
    stage's record) is not read. Returns the facts: family, `imported`, input size, MACs and
    parameters of the uncompressed model, `size_mb` of its file (checkpoint or imported ONNX),
    and for a PyTorch family the ONNX-vs-PyTorch parity on `cfg.parity_images` test images
    (recorded, not gated: the export stage gates the deployed model's).
    """
    adapter = adapter_for(model_cfg or ModelCfg())
    onnx_path = Path(out) / ONNX
    if not trains_in_torch(adapter):  # the imported graph is the reference
        facts = adapter.prepare(
            onnx_path,
            num_classes=len(manifest["splits"]["train"]["categories"]),
            input_size=input_size,
            max_detections=cfg.max_detections,
            score_floor=cfg.score_floor,
        )
        source = adapter.imported_onnx()
        facts = {
            "family": adapter.family,
            "imported": True,
            "input_size": input_size,
            "macs": facts["macs"],
            "params": facts["params"],
            "source": str(source),
            "source_md5": md5_file(source),
            "size_mb": source.stat().st_size / 2**20,
            "onnx_size_mb": onnx_path.stat().st_size / 2**20,
        }
    else:
        adapter, model, _ = load_checkpoint(checkpoint, model_cfg)
        # The exporter warns about every torchvision op it cannot find; this model uses none.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        exported = to_onnx(adapter, model, cfg, onnx_path)
        size = adapter.input_size(model)
        images = DetectionSet(manifest, "test", size).batch(slice(0, cfg.parity_images))
        macs, n_params = adapter.macs_and_params(model)
        facts = {
            "family": adapter.family,
            "imported": False,
            "input_size": size,
            "macs": macs,
            "params": n_params,
            "source": str(checkpoint),
            "source_md5": md5_file(Path(checkpoint)),
            "size_mb": Path(checkpoint).stat().st_size / 2**20,
            "onnx_size_mb": exported["size_mb"],
            **parity(adapter, model, onnx_path, images, cfg),
        }
        if facts["parity_max_abs_diff"] > cfg.parity_tolerance:
            log.warning(
                "reference: max |onnx - torch| = %.3g exceeds export.parity_tolerance=%g",
                facts["parity_max_abs_diff"],
                cfg.parity_tolerance,
            )
    write_json(Path(out) / FACTS, facts)
    return facts


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    checkpoint: Path = typer.Option(
        Path("artifacts/train/model.pt"), help="the trained, uncompressed FP32 model"
    ),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/reference")),
) -> None:
    """Export the trained FP32 model (or prepare the imported ONNX) once, as the reference."""
    with stage_entry("reference", params) as ctx:
        cfg = ctx.params.export
        ctx.log_params(cfg)
        for stale in (ONNX, FACTS, "metrics.json", "meta.json"):
            remove(out / stale)
        facts = run(
            cfg,
            checkpoint=checkpoint,
            manifest=read_manifest(manifest),
            out=out,
            model_cfg=ctx.params.model,
            input_size=ctx.params.train.input_size,
        )
        write_json(
            out / "meta.json",
            meta(cfg, {"checkpoint": checkpoint}, ("onnx", "onnxsim", "onnxslim", "onnxruntime")),
        )
        write_json(out / "metrics.json", facts)
        ctx.log_metrics(facts)
        ctx.log_artifact(out / ONNX, "model")
        log.info(
            "reference: %s FP32 (%s), %d MACs", facts["family"], facts["source"], facts["macs"]
        )


if __name__ == "__main__":
    app()
