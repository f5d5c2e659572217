"""Stage `distill`: knowledge distillation from the trained model into the pruned one.

Loss = the family's detection loss + its KD loss (`adapter.kd_loss`): `kd_weight` x soft class
targets at `temperature` (scaled by T^2; Hinton et al., 2015) + `reg_weight` x a box term (the
built-in detector: per-pixel heatmap KL and confidence-weighted L1 to the size/offset maps; YOLO:
class logits and the box distribution per anchor).
Optionally `feature_weight` * MSE between the teacher's features at block `feature_stage` and
the student's, mapped to the teacher's width by a 1x1 conv adapter trained with the student
(FitNets, Romero et al., 2015) and dropped afterwards. With `control: true` the pruned model
is also fine-tuned for the same epochs without KD, so the value of KD is measured, not assumed.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from torch import nn

from tasks.datasets.coco import DetectionSet, load_splits
from tasks.harness import skipped
from tasks.harness.config import DistillCfg, TrainCfg
from tasks.harness.errors import ConfigError
from tasks.harness.io import meta, remove, write_json
from tasks.harness.stage import stage_entry
from tasks.models import ModelAdapter, adapter_for, load_checkpoint, trains_in_torch
from tasks.models.training import evaluate_model, fit, pick_device

log = logging.getLogger(__name__)


class _FeatureKd:
    """Feature distillation at one block: forward hooks keep the block's latest output in
    teacher and student, and a 1x1 conv adapter (a submodule of the student while it trains,
    so the optimizer sees it) maps the student's channels to the teacher's."""

    def __init__(
        self, adapter: ModelAdapter, teacher: nn.Module, student: nn.Module, stage: str
    ) -> None:
        try:
            t_block, s_block = teacher.get_submodule(stage), student.get_submodule(stage)
        except AttributeError:
            blocks = sorted({p.rsplit(".", 1)[0] for p in adapter.prunable(student)} - {"out"})
            raise ConfigError(
                f"params.yaml: distill.feature_stage: unknown block {stage!r}; choose from "
                f"{', '.join(blocks)}"
            ) from None
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = [
            block.register_forward_hook(lambda m, a, y, key=key: self.out.__setitem__(key, y))
            for key, block in (("teacher", t_block), ("student", s_block))
        ]
        width = lambda block: [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1]  # noqa: E731
        student.kd_adapter = self.adapter = nn.Conv2d(
            width(s_block).out_channels, width(t_block).out_channels, 1
        )

    def loss(self) -> torch.Tensor:
        s, t = self.out["student"], self.out["teacher"]
        return F.mse_loss(self.adapter(s).float(), t.float())

    def remove(self, student: nn.Module) -> None:
        for hook in self.hooks:
            hook.remove()
        del student.kd_adapter


def run(
    cfg: DistillCfg,
    train_cfg: TrainCfg,
    *,
    adapter: ModelAdapter,
    teacher: nn.Module,
    student: nn.Module,
    train: DetectionSet,
    val: DetectionSet,
    on_epoch=None,
) -> tuple[nn.Module, dict]:
    """Distill `teacher` into `student`. Returns the student and metrics (teacher, student,
    and the no-KD control on the val split)."""
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    control = copy.deepcopy(student) if cfg.control else None
    features = (
        _FeatureKd(adapter, teacher, student, cfg.feature_stage) if cfg.feature_stage else None
    )

    def extra(raw, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = adapter.forward_train(teacher, x)
        loss = adapter.kd_loss(raw, target, cfg.temperature, cfg.kd_weight, cfg.reg_weight)
        if features is not None:
            loss = loss + cfg.feature_weight * features.loss()
        return loss

    teacher.to(pick_device(train_cfg))  # once: the loop trains the student on this device
    student, history = fit(
        adapter,
        student,
        train_cfg,
        train=train,
        val=val,
        epochs=cfg.epochs,
        lr=cfg.lr,
        extra_loss=extra,
        on_epoch=on_epoch,
        desc="distill",
    )
    if features is not None:
        features.remove(student)
    teacher_map = evaluate_model(adapter, teacher.cpu(), val)
    metrics = {
        "teacher_val_map50": teacher_map["map50"],
        "teacher_val_map50_95": teacher_map["map50_95"],
        "student_val_map50": history[-1]["val_map50"],
        "student_val_map50_95": history[-1]["val_map50_95"],
    }
    if control is not None:
        control, rows = fit(
            adapter,
            control,
            train_cfg,
            train=train,
            val=val,
            epochs=cfg.epochs,
            lr=cfg.lr,
            desc="control (no KD)",
        )
        metrics["no_kd_val_map50"] = rows[-1]["val_map50"]
        metrics["no_kd_val_map50_95"] = rows[-1]["val_map50_95"]
        metrics["kd_gain_map50"] = metrics["student_val_map50"] - metrics["no_kd_val_map50"]
    return student, metrics


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    teacher: Path = typer.Option(Path("artifacts/train/model.pt")),
    student: Path = typer.Option(Path("artifacts/prune/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/distill")),
) -> None:
    """Distill the trained model into the pruned one."""
    with stage_entry("distill", params) as ctx:
        cfg = ctx.params.distill
        ctx.log_params(cfg)
        for stale in ("model.pt", "metrics.json", "meta.json"):
            remove(out / stale)
        imported = adapter_for(ctx.params.model)
        if not trains_in_torch(imported):  # an imported ONNX: nothing to distill
            metrics = skipped.write(imported, out, config=cfg, checkpoint=student)
            ctx.log_metrics(metrics)
            log.info("distill: %s", metrics["status"])
            return
        _, teacher_model, _ = load_checkpoint(teacher, ctx.params.model)
        adapter, student_model, ckpt = load_checkpoint(student, ctx.params.model)
        _, train, val = load_splits(manifest, adapter.input_size(student_model))

        model, metrics = run(
            cfg,
            ctx.params.train,
            adapter=adapter,
            teacher=teacher_model,
            student=student_model,
            train=train,
            val=val,
            on_epoch=ctx.log_epoch,
        )
        adapter.save(
            out / "model.pt",
            model,
            ckpt["categories"],
            {"distill_cfg": cfg.model_dump(mode="json"), "metrics": metrics},
        )
        write_json(out / "meta.json", meta(cfg, {"teacher": teacher, "student": student}))
        write_json(out / "metrics.json", metrics)
        ctx.log_metrics(metrics)
        log.info(
            "distill: student %.4f, no-KD control %s, teacher %.4f (val mAP@0.5)",
            metrics["student_val_map50"],
            metrics.get("no_kd_val_map50", "n/a"),
            metrics["teacher_val_map50"],
        )


if __name__ == "__main__":
    app()
