"""The PyTorch stages (train, prune, distill) when the model family has no PyTorch model (an
imported ONNX, `model.family: onnx`): each reports `skipped: imported ONNX` in its metrics and
still writes the outputs dvc.yaml declares, so DVC carries on to quantize.

The checkpoint they write is a record, not weights: {family, config: {source, source_md5},
state_dict: {}, categories}, so the lineage of every later stage names the imported file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.datasets.coco import read_manifest
from tasks.harness.io import md5_file, meta, write_json, write_text
from tasks.models.checkpoint import read_checkpoint, write_checkpoint


def record(adapter, manifest: Path) -> dict:
    """The imported model's checkpoint record (categories from the cleaned manifest)."""
    src = adapter.imported_onnx()
    return {
        "family": adapter.family,
        "config": {"source": str(src), "source_md5": md5_file(src)},
        "state_dict": {},
        "categories": read_manifest(manifest)["splits"]["train"]["categories"],
    }


def write(
    adapter,
    out: Path,
    *,
    config,
    checkpoint: Path | None = None,
    manifest: Path | None = None,
    plots: dict[str, tuple[str, ...]] | None = None,
) -> dict:
    """Write the skipped stage's outputs under `out`: model.pt (the record: copied from
    `checkpoint`, or made from `manifest`), header-only plot CSVs, meta.json, metrics.json.
    Returns the metrics."""
    if checkpoint is not None:
        read_checkpoint(checkpoint)  # still one of ours
        tmp = out / ".tmp-model.pt"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, tmp)
        tmp.replace(out / "model.pt")
        ckpt = read_checkpoint(out / "model.pt")
    else:
        ckpt = record(adapter, manifest)
        write_checkpoint(out / "model.pt", ckpt)
    for rel, columns in (plots or {}).items():
        write_text(out / rel, ",".join(columns) + "\n")
    metrics = {"status": adapter.skipped, **ckpt["config"]}
    write_json(out / "meta.json", meta(config, {"model": adapter.imported_onnx()}))
    write_json(out / "metrics.json", metrics)
    return metrics
