"""Stage `train`: the FP32 model of the family `params.yaml: model` names, trained on the
cleaned manifest by the shared loop (tasks/models/training.py) with the family's own loss.

Per epoch: train loss and val mAP to MLflow and to the DVC plot `plots/curves.csv`. With
`train.patience` training stops early on val mAP@0.5 and keeps the best epoch (metrics say
which epoch it stopped at and why). The
checkpoint holds the family, model config, weights and categories (loadable with
weights_only=True).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import typer

from tasks.datasets.coco import DetectionSet, check_min_boxes, load_splits, read_manifest
from tasks.harness import skipped
from tasks.harness.config import TrainCfg
from tasks.harness.io import meta, remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.models import ModelAdapter, adapter_for, trains_in_torch
from tasks.models.training import (
    EarlyStop,
    autocast_dtype,
    early_stop_for,
    evaluate_model,
    fit,
    pick_device,
    precision_of,
)
from tasks.preprocess.letterbox import build_size

log = logging.getLogger(__name__)
COLUMNS = ("epoch", "train_loss", "val_map50", "val_map50_95")  # plots/curves.csv


def run(
    adapter: ModelAdapter,
    cfg: TrainCfg,
    *,
    train: DetectionSet,
    val: DetectionSet,
    on_epoch=None,
    early_stop: EarlyStop | None = None,
):
    """Train the family's model on `train` (from scratch, or from the user's `model.weights`).
    Early stopping: `early_stop`, else the one `cfg.patience` / `cfg.min_delta` ask for.
    Returns (model on CPU, per-epoch history rows)."""
    model = adapter.build(len(train.categories), build_size(cfg.input_size), cfg.seed)
    return fit(
        adapter,
        model,
        cfg,
        train=train,
        val=val,
        epochs=cfg.epochs,
        lr=cfg.lr,
        on_epoch=on_epoch,
        early_stop=early_stop or early_stop_for(cfg.patience, cfg.min_delta),
    )


def stop_summary(stop: EarlyStop | None, history: list[dict], epochs: int) -> dict:
    """The stop fields metrics record: the epoch training stopped at, the epoch whose weights
    the model holds, and why (without early stopping: every epoch, the last epoch's)."""
    if stop is not None:
        return stop.summary(epochs)
    return {
        "epochs_planned": epochs,
        "stopped_epoch": len(history),
        "best_epoch": len(history),
        "best_val_map50": history[-1]["val_map50"] if history else None,
        "stop_reason": "epochs: early stopping off",
    }


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/train")),
) -> None:
    """Train the FP32 detector on the cleaned manifest."""
    with stage_entry("train", params) as ctx:
        cfg = ctx.params.train
        ctx.log_params(cfg)
        for stale in ("model.pt", "metrics.json", "meta.json", "plots/curves.csv"):
            remove(out / stale)
        adapter = adapter_for(ctx.params.model)
        if not trains_in_torch(adapter):  # an imported ONNX: nothing to train
            metrics = skipped.write(
                adapter, out, config=cfg, manifest=manifest, plots={"plots/curves.csv": COLUMNS}
            )
            ctx.log_metrics(metrics)
            log.info("train: %s (%s)", metrics["status"], metrics["source"])
            return
        m = read_manifest(manifest)
        check_min_boxes(m, manifest, "train", cfg.min_boxes, "train.min_boxes")
        m, train, val = load_splits(manifest, cfg.input_size)
        log.info("train: %d images, val: %d images", len(train), len(val))
        early_stop = early_stop_for(cfg.patience, cfg.min_delta)
        model, history = run(
            adapter, cfg, train=train, val=val, on_epoch=ctx.log_epoch, early_stop=early_stop
        )
        stop = stop_summary(early_stop, history, cfg.epochs)
        macs, n_params = adapter.macs_and_params(model)
        final = evaluate_model(adapter, model, val)
        metrics = {
            "val_map50": final["map50"],
            "val_map50_95": final["map50_95"],
            "train_loss": history[stop["best_epoch"] - 1]["train_loss"],
            "macs": macs,
            "params": n_params,
            "precision": precision_of(autocast_dtype(cfg, pick_device(cfg))),
            **stop,
        }
        adapter.save(
            out / "model.pt",
            model,
            m["splits"]["train"]["categories"],
            {"train_cfg": cfg.model_dump(mode="json"), "metrics": metrics},
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        write_text(out / "plots" / "curves.csv", buf.getvalue())
        write_json(out / "meta.json", meta(cfg, {"manifest": manifest}, ("pycocotools",)))
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics({"macs": macs, "params": n_params, **stop})  # the rest is per epoch
        ctx.log_artifact(out / "plots" / "curves.csv", "plots")


if __name__ == "__main__":
    app()
