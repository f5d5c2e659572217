"""Early stopping on val mAP@0.5 in the shared training loop (tasks/models/training.py)."""

import copy

import pytest
import torch
from torch import nn

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import DistillCfg, PruneCfg, TrainCfg
from tasks.harness.errors import ConfigError
from tasks.models.training import EarlyStop, early_stop_for, fit
from tasks.preprocess.letterbox import build_size

# epoch:  1     2     3     4      5     6     7     8
CURVE = [0.10, 0.50, 0.60, 0.605, 0.59, 0.608, 0.58, 0.70]


def _walk(stop: EarlyStop, curve: list[float], model: nn.Module | None = None) -> int:
    """Feed `curve` epoch by epoch (the model's weight set to the epoch number, so the kept
    weights say which epoch they are); returns the epoch after which it stopped (0: never)."""
    for epoch, value in enumerate(curve, start=1):
        if model is not None:
            model.weight.data.fill_(epoch)
        if stop.update(epoch, value, model):
            return epoch
    return 0


def test_stops_after_patience_epochs_without_a_gain_over_min_delta_and_keeps_the_best():
    # 0.605 and 0.608 gain less than 0.01 over epoch 3's 0.60: epochs 4, 5 and 6 wait, yet
    # epoch 6 is the highest seen, so its weights are the ones kept
    model = nn.Linear(1, 1, bias=False)
    stop = EarlyStop(patience=3, min_delta=0.01)
    assert _walk(stop, CURVE, model) == 6
    stop.restore(model)
    assert model.weight.item() == 6
    s = stop.summary(epochs=len(CURVE))
    assert (s["stopped_epoch"], s["best_epoch"], s["best_val_map50"]) == (6, 6, 0.608)
    assert s["epochs_planned"] == 8 and s["stop_reason"].endswith("after epoch 3")


def test_the_kept_epoch_is_the_highest_and_a_tie_goes_to_the_later_epoch():
    # epochs 3-5 gain less than 0.05 over epoch 2; epoch 5 ties epoch 3's 0.72 and is kept
    model = nn.Linear(1, 1, bias=False)
    stop = EarlyStop(patience=3, min_delta=0.05)
    assert _walk(stop, [0.5, 0.7, 0.72, 0.7, 0.72, 0.9], model) == 5
    stop.restore(model)
    assert (stop.best_epoch, model.weight.item()) == (5, 5)


def test_without_min_delta_small_gains_count_and_a_late_gain_resets_the_wait():
    stop = EarlyStop(patience=3)
    assert _walk(stop, CURVE) == 0  # 0.605 (4), 0.608 (6) and 0.70 (8) each improve
    assert stop.best_epoch == 8 and not stop.stopped
    assert stop.summary(8)["stop_reason"] == "epochs: ran all 8"
    assert _walk(EarlyStop(patience=1), CURVE) == 5  # the first epoch without a gain


def test_off_unless_patience_is_set_and_the_params_are_typed():
    assert early_stop_for(None, 0.01) is None
    assert isinstance(early_stop_for(2, 0.0), EarlyStop)
    with pytest.raises(ValueError):
        EarlyStop(patience=0)
    for cfg in (TrainCfg, PruneCfg, DistillCfg):
        assert cfg().patience is None
        assert cfg(patience=4, min_delta=0.002).min_delta == 0.002
        with pytest.raises(ValueError):
            cfg(patience=0)
        with pytest.raises(ValueError):
            cfg(min_delta=-0.1)


def _first(manifest: dict, split: str, n: int) -> dict:
    """The manifest with only the first `n` images of `split` (and their annotations)."""
    coco = manifest["splits"][split]
    images = coco["images"][:n]
    keep = {im["id"] for im in images}
    anns = [a for a in coco["annotations"] if a["image_id"] in keep]
    sub = {**coco, "images": images, "annotations": anns}
    return {**manifest, "splits": {split: sub}}


def test_the_loop_stops_and_hands_back_the_best_epochs_weights(tiny, adapter, tiny_manifest):
    """The real loop on a constructed val curve (each epoch's row is rewritten by `on_epoch`
    before the stop reads it): 0.5, 0.9, 0.6, 0.7 with patience 2 stops after epoch 4 and
    hands back epoch 2's weights, though epochs 3 and 4 trained them further."""
    curve = [0.5, 0.9, 0.6, 0.7, 0.95]
    cfg = tiny.train.model_copy(update={"batch_size": 16})
    size = cfg.input_size
    train = DetectionSet(_first(tiny_manifest, "train", 32), "train", size)
    val = DetectionSet(_first(tiny_manifest, "val", 8), "val", size)
    model = adapter.build(len(train.categories), build_size(size), cfg.seed)
    seen = []

    def constructed(row: dict) -> None:
        row["val_map50"] = curve[row["epoch"] - 1]
        seen.append(copy.deepcopy(model.state_dict()))

    stop = EarlyStop(patience=2)
    out, history = fit(
        adapter,
        model,
        cfg,
        train=train,
        val=val,
        epochs=len(curve),
        lr=cfg.lr,
        on_epoch=constructed,
        early_stop=stop,
    )
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert stop.summary(len(curve))["best_epoch"] == 2
    state = out.state_dict()
    assert all(torch.equal(state[k], seen[1][k].cpu()) for k in state)
    assert not all(torch.equal(state[k], seen[3][k].cpu()) for k in state)


def test_params_yaml_patience_must_be_a_positive_epoch_count(tmp_path):
    from tasks.harness.config import load_params

    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  patience: 0\n")
    with pytest.raises(ConfigError, match="train.patience"):
        load_params(bad)
