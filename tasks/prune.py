"""Stage `prune`: structured channel pruning of the trained detector with torch-pruning.

torch-pruning's dependency graph (Fang et al., "DepGraph", CVPR 2023) removes coupled channels
together (the neck's additions tie lat3/lat2 and smooth2/lat1), so the pruned model stays valid.
Pruning proceeds in `steps` chunks towards the MACs target, each followed by a short fine-tune.
The pruned widths go into the checkpoint config, so export rebuilds the model without
torch-pruning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
import typer

from tasks.cli import stage_entry
from tasks.coco import DetectionSet, load_splits
from tasks.config import PruneCfg, TrainCfg
from tasks.errors import ConfigError
from tasks.io import meta, remove, write_json
from tasks.model import Detector, load_checkpoint, macs_and_params
from tasks.train import detection_loss, evaluate_model, fit, make_targets, save_checkpoint

log = logging.getLogger(__name__)

IMPORTANCE: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
}
GRANULARITY = 200  # pruner micro-steps over the whole schedule: ~0.5% of channels each


def _taylor_gradients(model: Detector, data: DetectionSet, batch: int = 32) -> None:
    """Taylor importance needs gradients of the loss: one batch, fresh grads."""
    model.zero_grad()
    idx = np.arange(min(batch, len(data)))
    heat, reg, mask = make_targets(
        [data.boxes[i] for i in idx],
        [data.labels[i] for i in idx],
        model.cfg.num_classes,
        model.cfg.input_size,
    )
    raw = model(torch.from_numpy(data.batch(idx)))
    detection_loss(raw, heat, reg, mask, model.cfg.num_classes).backward()


def run(
    cfg: PruneCfg, train_cfg: TrainCfg, *, model: Detector, train: DetectionSet, val: DetectionSet
) -> tuple[Detector, dict]:
    """Prune `model` in place to remove `cfg.macs_reduction` of its MACs. Returns it and metrics."""
    if cfg.importance not in IMPORTANCE:
        raise ConfigError(
            f"unsupported importance {cfg.importance!r}; choose one of {', '.join(IMPORTANCE)}"
        )
    unknown = [p for p in cfg.ignore if p not in model.layer_shapes()]
    if unknown:
        raise ConfigError(
            f"params.yaml: prune.ignore: unknown layers {unknown}; choose from "
            f"{', '.join(model.layer_shapes())}"
        )
    base_macs, base_params = macs_and_params(model)
    base_map = evaluate_model(model, val)
    ignored = [model.get_submodule(p) for p in cfg.ignore]
    size = model.cfg.input_size
    model.train()
    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(1, 3, size, size),
        importance=IMPORTANCE[cfg.importance](),
        global_pruning=cfg.global_pruning,
        pruning_ratio=0.9,
        iterative_steps=GRANULARITY,
        ignored_layers=ignored,
        round_to=cfg.round_to,
    )
    macs, history = base_macs, []
    for step in range(1, cfg.steps + 1):
        goal = base_macs * (1 - cfg.macs_reduction * step / cfg.steps)
        while macs > goal and pruner.current_step < GRANULARITY:
            if cfg.importance == "taylor":
                _taylor_gradients(model, train)
            pruner.step()
            macs, _ = macs_and_params(model)
        model.cfg.layers = model.layer_shapes()
        pruned_map = evaluate_model(model, val)
        log.info(
            "prune step %d: MACs %.1fM (%.1f%% of base), val mAP@0.5 %.4f before fine-tune",
            step,
            macs / 1e6,
            100 * macs / base_macs,
            pruned_map["map50"],
        )
        if cfg.finetune_epochs:
            model, rows = fit(
                model,
                train_cfg,
                train=train,
                val=val,
                epochs=cfg.finetune_epochs,
                lr=cfg.lr,
                desc=f"prune step {step} fine-tune",
            )
        history.append(
            {
                "step": step,
                "macs": macs,
                "val_map50_after_prune": pruned_map["map50"],
                "val_map50_after_finetune": evaluate_model(model, val)["map50"],
            }
        )
    model.zero_grad(set_to_none=True)
    macs, params = macs_and_params(model)
    achieved = 1 - macs / base_macs
    if abs(achieved - cfg.macs_reduction) > 0.05:
        # Per-layer ratios with round_to > 1 move every layer's width in the same 8-channel
        # steps, so MACs fall in coarse jumps; round_to=1 (or global pruning) follows the target.
        log.warning(
            "prune: removed %.1f%% of MACs for a %.1f%% target (round_to=%d)",
            100 * achieved,
            100 * cfg.macs_reduction,
            cfg.round_to,
        )
    final = evaluate_model(model, val)
    return model.eval(), {
        "macs_before": base_macs,
        "macs": macs,
        "macs_ratio": macs / base_macs,
        "macs_reduction_achieved": 1 - macs / base_macs,
        "params_before": base_params,
        "params": params,
        "params_ratio": params / base_params,
        "val_map50_before": base_map["map50"],
        "val_map50": final["map50"],
        "val_map50_95": final["map50_95"],
        "val_map50_right_after_pruning": history[-1]["val_map50_after_prune"],
        "steps": history,
    }


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    checkpoint: Path = typer.Option(Path("artifacts/train/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/prune")),
) -> None:
    """Prune the trained detector towards the MACs target, fine-tuning between steps."""
    with stage_entry("prune", params) as ctx:
        cfg = ctx.params.prune
        ctx.log_params(cfg)
        for stale in ("model.pt", "metrics.json", "meta.json"):
            remove(out / stale)
        model, ckpt = load_checkpoint(checkpoint)
        size = model.cfg.input_size
        _, train, val = load_splits(manifest, size)
        model, metrics = run(cfg, ctx.params.train, model=model, train=train, val=val)
        save_checkpoint(
            out / "model.pt",
            model,
            ckpt["categories"],
            {"prune_cfg": cfg.model_dump(mode="json"), "metrics": metrics},
        )
        write_json(out / "meta.json", meta(cfg, {"checkpoint": checkpoint}, ("torch-pruning",)))
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
        log.info(
            "pruned: MACs %.1fM -> %.1fM (%.1f%% removed), val mAP@0.5 %.4f -> %.4f",
            metrics["macs_before"] / 1e6,
            metrics["macs"] / 1e6,
            100 * metrics["macs_reduction_achieved"],
            metrics["val_map50_before"],
            metrics["val_map50"],
        )


if __name__ == "__main__":
    app()
