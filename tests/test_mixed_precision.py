"""Which precision the shared training loop trains in (`train.amp`, tasks/models/training.py):
bf16 autocast only where the CPU has bf16 instructions, unless the params force it."""

from pathlib import Path

import pytest
import torch

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import TrainCfg
from tasks.harness.errors import ConfigError
from tasks.models.training import autocast_dtype, cpu_has_bf16, fit, precision_of
from tasks.preprocess.letterbox import build_size
from tests.test_early_stop import _first

CPU = torch.device("cpu")


def _cpuinfo_has_bf16() -> bool:
    """The kernel's own word on the CPU's bf16 instructions, independent of torch's helpers."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo (not Linux)")
def test_bf16_detection_agrees_with_the_kernels_cpu_flags():
    assert cpu_has_bf16() == _cpuinfo_has_bf16()


def test_auto_trains_bf16_only_where_the_cpu_has_it_and_true_or_false_force_it():
    auto = autocast_dtype(TrainCfg(), CPU)
    assert auto == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype(TrainCfg(amp=True), CPU) == torch.bfloat16
    assert autocast_dtype(TrainCfg(amp=False), CPU) is None
    assert autocast_dtype(TrainCfg(), torch.device("cuda")) == torch.float16
    assert autocast_dtype(TrainCfg(amp=False), torch.device("cuda")) is None
    assert [precision_of(d) for d in (None, torch.bfloat16)] == ["float32", "bfloat16"]


def test_params_yaml_amp_takes_auto_or_a_bool(tmp_path):
    from tasks.harness.config import load_params

    good = tmp_path / "params.yaml"
    good.write_text("train:\n  amp: auto\n")
    assert load_params(good).train.amp == "auto"
    good.write_text("train:\n  amp: false\n")
    assert load_params(good).train.amp is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  amp: fast\n")
    with pytest.raises(ConfigError, match="train.amp"):
        load_params(bad)


@pytest.mark.parametrize("amp", [False, True, "auto"])
def test_the_loop_runs_the_forward_pass_in_the_chosen_precision(tiny, adapter, tiny_manifest, amp):
    """The detector's raw outputs, seen by `extra_loss` inside the loop, have the dtype
    `autocast_dtype` names (float32 when it names none)."""
    cfg = tiny.train.model_copy(update={"batch_size": 16, "amp": amp})
    size = cfg.input_size
    train = DetectionSet(_first(tiny_manifest, "train", 16), "train", size)
    model = adapter.build(len(train.categories), build_size(size), cfg.seed)
    seen = []

    def record(raw, x):
        seen.append(raw.dtype)
        return torch.zeros(())

    fit(adapter, model, cfg, train=train, val=None, epochs=1, lr=cfg.lr, extra_loss=record)
    assert seen == [autocast_dtype(cfg, CPU) or torch.float32]
