"""Model families behind one interface (`ModelAdapter`, tasks/models/base.py).

`adapter_for(cfg)` returns the adapter that `params.yaml: model` names: a registered family, or a
user's `factory: "package.module:function"` (called with the `ModelCfg`, returning an adapter).
`adapter_of(ckpt, path)` returns the adapter of the family a checkpoint records, so a stage that
reads a checkpoint never needs to know which family wrote it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from tasks.harness.errors import ConfigError, DataError
from tasks.harness.signature import OUTPUTS
from tasks.models.base import ModelAdapter, PruneSpec
from tasks.models.config import ModelCfg

__all__ = [
    "FAMILIES",
    "OUTPUTS",
    "ModelAdapter",
    "PruneSpec",
    "adapter_for",
    "adapter_of",
    "load_checkpoint",
    "trains_in_torch",
]

# family name -> "module:function" building its adapter from the ModelCfg (imported on use, so
# the built-in family never imports Ultralytics)
FAMILIES: dict[str, str] = {
    "centernet": "tasks.models.centernet:adapter",
    "yolo": "tasks.models.yolo:adapter",
    "onnx": "tasks.models.onnx_import:adapter",
}


def _resolve(spec: str, key: str) -> Callable[[ModelCfg], ModelAdapter]:
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ConfigError(f"params.yaml: {key}: {spec!r} is not 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as e:
        raise ConfigError(f"params.yaml: {key}: {spec!r} does not import ({e})") from e
    except AttributeError as e:
        raise ConfigError(f"params.yaml: {key}: {module} has no {func!r}") from e


def adapter_for(cfg: ModelCfg) -> ModelAdapter:
    """The adapter `params.yaml: model` names. Raises ConfigError (exit 2) for an unknown
    family, a factory that does not import, or one that returns no adapter."""
    if cfg.factory:
        key, spec = "model.factory", cfg.factory
    elif cfg.family in FAMILIES:
        key, spec = "model.family", FAMILIES[cfg.family]
    else:
        raise ConfigError(
            f"params.yaml: model.family: unknown family {cfg.family!r}; choose one of "
            f"{', '.join(FAMILIES)} or give model.factory: 'package.module:function'"
        )
    adapter = _resolve(spec, key)(cfg)
    if not isinstance(adapter, ModelAdapter):
        raise ConfigError(f"params.yaml: {key}: {spec!r} returned {type(adapter).__name__}, "
                          "not a ModelAdapter (see tasks/models/base.py)")  # fmt: skip
    return adapter


def trains_in_torch(adapter: ModelAdapter) -> bool:
    """Whether the family has a PyTorch model that train, prune and distill work on (False for
    an imported ONNX; an adapter that does not say is a PyTorch family)."""
    return bool(getattr(adapter, "torch_stages", True))


def adapter_of(ckpt: dict, path: Path, cfg: ModelCfg | None = None) -> ModelAdapter:
    """The adapter of the family a project checkpoint records (`ckpt["family"]`; checkpoints
    from before families existed are the built-in detector's). A user's factory family is
    found through `cfg.factory`."""
    family = ckpt.get("family", "centernet")
    cfg = cfg or ModelCfg()
    if family in FAMILIES:
        return adapter_for(cfg.model_copy(update={"family": family, "factory": None}))
    if cfg.factory:
        adapter = adapter_for(cfg)
        if adapter.family == family:
            return adapter
    raise DataError(
        f"{path}: checkpoint of model family {family!r}, which neither a registered family "
        "nor params.yaml: model.factory provides"
    )


def load_checkpoint(path: Path, cfg: ModelCfg | None = None):
    """(adapter, model in eval mode, checkpoint dict) of a project checkpoint, any family."""
    from tasks.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(Path(path))
    adapter = adapter_of(ckpt, Path(path), cfg)
    return adapter, adapter.load(ckpt, Path(path)), ckpt
