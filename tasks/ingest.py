"""Stage `ingest`: any supported dataset -> the internal COCO manifest that label QA reads.

`dataset.format` picks the source: `builtin` composes the built-in data under `<out>/builtin`:
the digits (`data.kind: digits`, section `data`, see tasks/datasets/digits.py) or the coloured
shapes (`data.kind: shapes`, `data.shapes`, see tasks/datasets/shapes.py); `coco`, `yolo` and
`voc` read the folder `dataset.path` (see tasks/datasets/), which is never written to. A dataset
without its own train/val/test is split by `dataset.split`, near-duplicates kept together.
Output: `<out>/manifest.json` = {format, root, categories, splits: {split: COCO dict}}, each
image with the MD5 of its file, so the manifest changes whenever a label or an image does;
metrics: format, file count, content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import typer

from tasks.datasets import digits, shapes
from tasks.datasets.common import POOL, SPLITS
from tasks.datasets.readers import read
from tasks.datasets.split import split_pool
from tasks.harness.config import DataCfg, DatasetCfg
from tasks.harness.errors import ConfigError
from tasks.harness.io import md5_file, remove, write_json
from tasks.harness.stage import stage_entry

log = logging.getLogger(__name__)
BUILTIN = "builtin"  # the composed built-in data, under the stage's out folder
MANIFEST = "manifest.json"


def run(cfg: DatasetCfg, data_cfg: DataCfg, *, near_duplicate_bits: int, out_dir: Path) -> dict:
    """Read (or compose) the dataset and write `<out_dir>/manifest.json`. Returns the metrics.

    Raises:
        DataError: a file of the dataset cannot be used (names the file and the field).
        ConfigError: `dataset.split` is missing for a pooled dataset, or given for a split one.
    """
    out_dir = Path(out_dir)
    remove(out_dir / MANIFEST)
    builtin = out_dir / BUILTIN
    if cfg.format == "builtin":
        if data_cfg.kind == "shapes":
            composed = shapes.generate(data_cfg.shapes, builtin)
        else:
            composed = digits.run(data_cfg, out_dir=builtin)
        source = read(builtin, DatasetCfg(), "coco")
        source.format = "builtin"
        source.notes["builtin"] = data_cfg.kind
        source.notes["noise"] = composed["noise"]
    else:
        source = read(Path(cfg.path), cfg)
        remove(builtin)
        builtin.mkdir(parents=True)  # declared in dvc.yaml: present, empty
    if POOL in source.splits:
        if cfg.split is None:
            raise ConfigError(
                f"params.yaml: dataset.split: required: {source.root} has no train/val/test "
                "split of its own (e.g. dataset.split: {val: 0.15, test: 0.25, seed: 0})"
            )
        source.splits = split_pool(source.splits[POOL], source.root, cfg.split, near_duplicate_bits)
    elif cfg.split is not None and cfg.format != "builtin":
        raise ConfigError(
            f"params.yaml: dataset.split: {source.root} has its own train/val/test split; "
            "remove dataset.split"
        )
    files = len(source.files)
    for split in source.splits.values():
        for im in split["images"]:
            path = source.root / im["file_name"]
            if path.is_file():
                im["md5"] = md5_file(path)
                files += 1
    categories = sorted(source.categories, key=lambda c: c["id"])
    manifest = {
        "format": source.format,
        "root": str(source.root),
        "categories": categories,
        "splits": {s: {**source.splits[s], "categories": categories} for s in SPLITS},
    }
    content = hashlib.md5(
        json.dumps(manifest["splits"], sort_keys=True, default=str).encode()
    ).hexdigest()
    metrics = {
        "format": source.format,
        "files": files,
        "content_md5": content,
        "classes": len(categories),
        **{
            s: {
                "images": len(source.splits[s]["images"]),
                "annotations": len(source.splits[s]["annotations"]),
                "negatives": len(source.splits[s]["images"])
                - len({a["image_id"] for a in source.splits[s]["annotations"]}),
            }
            for s in SPLITS
        },
        **source.notes,
    }
    write_json(out_dir / MANIFEST, manifest)
    log.info(
        "ingest: %s dataset at %s, %d files, %s",
        source.format,
        source.root,
        files,
        ", ".join(f"{s} {metrics[s]['images']} images" for s in SPLITS),
    )
    return metrics


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out: Path = typer.Option(Path("artifacts/ingest"), help="folder for the manifest"),
) -> None:
    """Turn the dataset named in params.yaml into the internal COCO manifest."""
    with stage_entry("ingest", params) as ctx:
        p = ctx.params
        result = run(
            p.dataset, p.data, near_duplicate_bits=p.label_qa.near_duplicate_bits, out_dir=out
        )
        ctx.log_params(p.dataset)
        ctx.log_metrics({k: v for k, v in result.items() if not isinstance(v, str)})
        write_json(out / "metrics.json", result)


if __name__ == "__main__":
    app()
