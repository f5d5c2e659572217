"""The model-adapter interface: everything a model family owns, and nothing else does.

A stage never imports a model module: it asks `tasks.models.adapter_for(...)` for the adapter of
the family named in `params.yaml: model` (or recorded in a checkpoint) and calls it. An adapter
is a small stateless object; the model it builds is a plain `torch.nn.Module`.

The shared training loop (`tasks.models.training`) treats the model's raw output as opaque: it calls
`adapter.forward_train(model, x)` and hands the result to `adapter.loss` (and, when distilling,
`adapter.kd_loss` with the teacher's `forward_train` output on the same batch). Every deployable
graph ends in the project's fixed signature (`OUTPUTS`): num_detections (B,) int32, boxes
(B, K, 4) xyxy in input pixels, scores (B, K) sorted descending, classes (B, K) int32; rows past
num_detections are padding.

Images reach a model as float32 (B, 3, H, W) in [0, 1], letterboxed to `input_size(model)` =
(W, H) (aspect ratio kept, grey padding); normalisation beyond that is the model's own business.
Sizes are (width, height) everywhere in the project (params' `train.input_size: [w, h]`, PIL,
the letterbox); arrays and tensors are (H, W) / NCHW. An adapter may declare `input_stride`
(an int, default 1): each side of the input must be a multiple of it (params validation says so).
Callers read `input_size` through `tasks.preprocess.letterbox.input_wh`, so an older adapter
returning one
side (a square) still works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: a stage that reads params need not import torch
    import torch
    from torch import nn


@dataclass
class PruneSpec:
    """What structured pruning (torch-pruning's MetaPruner) may touch in a model.

    `ignored_layers`: modules whose output channels must stay (e.g. the heads' final convs).
    `round_to`: channel counts stay multiples of this (None: the stage's `prune.round_to`).
    `customized_pruners` / `unwrapped_parameters` / `root_module_types`: passed to MetaPruner
    as they are, for families with ops torch-pruning cannot trace on its own.
    """

    ignored_layers: list[nn.Module] = field(default_factory=list)
    round_to: int | None = None
    customized_pruners: dict[Any, Any] | None = None
    unwrapped_parameters: list[tuple[nn.Parameter, int]] | None = None
    root_module_types: list[type] | None = None


@runtime_checkable
class ModelAdapter(Protocol):
    """One per model family; registered by name in `tasks.models` (or a user's factory)."""

    family: str
    # Optional, so not declared here (a Protocol member would be required): `torch_stages =
    # False` for a family with no PyTorch model (an imported ONNX): train, prune and distill then
    # record a skip, and export starts from the file. Read it with
    # `tasks.models.trains_in_torch(adapter)`.

    # -- build, save, load -------------------------------------------------------------------
    def build(self, num_classes: int, input_size: int | tuple[int, int], seed: int) -> nn.Module:
        """A fresh model for inputs of `input_size`, or the user's `model.weights` re-headed if
        needed, in train mode. The stages pass one side for a square (as before rectangles) and
        (width, height) for a rectangle (`tasks.preprocess.letterbox.build_size`)."""

    def save(self, path: Path, model: nn.Module, categories: list[dict], extra: dict) -> None:
        """Write the project's checkpoint atomically: {family, config, state_dict, categories,
        **extra}; loadable with `torch.load(weights_only=True)` (no pickled objects)."""

    def load(self, ckpt: dict, path: Path) -> nn.Module:
        """Rebuild the model (eval mode) from a checkpoint dict read with weights_only=True.
        Raises DataError naming `path` when the checkpoint does not fit the family."""

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        """Input (width, height) in pixels (the letterbox target)."""

    def num_classes(self, model: nn.Module) -> int: ...

    # -- training ----------------------------------------------------------------------------
    def forward_train(self, model: nn.Module, x: torch.Tensor) -> Any:
        """The raw output that `loss` and `kd_loss` read (model in train mode for the student;
        the teacher is in eval mode and must give the same kind of output)."""

    def loss(
        self, model: nn.Module, raw: Any, boxes: list[np.ndarray], labels: list[np.ndarray]
    ) -> torch.Tensor:
        """The family's detection loss. boxes: per image (N, 4) xyxy float32 input pixels;
        labels: per image (N,) int64 class indices (0..C-1)."""

    def kd_loss(
        self, student_raw: Any, teacher_raw: Any, temperature: float, cls_weight: float,
        box_weight: float,
    ) -> torch.Tensor:  # fmt: skip
        """Distillation loss between two models of the family (class soft targets with
        temperature, scaled by T^2, + box/regression term)."""

    # -- pruning -----------------------------------------------------------------------------
    def prunable(self, model: nn.Module) -> list[str]:
        """Module paths a user may name in `prune.ignore` (the conv blocks)."""

    def prune_spec(self, model: nn.Module, ignore: list[str]) -> PruneSpec: ...

    def after_prune(self, model: nn.Module) -> None:
        """Record the pruned widths so that `save` / `load` rebuild the model without
        torch-pruning (or save the structure the family's own way)."""

    # -- deployment --------------------------------------------------------------------------
    def deployable(
        self, model: nn.Module, max_detections: int, score_floor: float, fold: bool = True
    ) -> nn.Module:
        """An eval-mode module (a copy: `model` is untouched) mapping images to `OUTPUTS`,
        decode (and NMS where the family needs it) inside; BatchNorm folded when `fold`.
        Exportable by `torch.onnx.export(dynamo=True)` with a dynamic batch axis."""

    def macs_and_params(self, model: nn.Module) -> tuple[int, int]:
        """MACs at `input_size` for batch 1 and parameter count (torch-pruning's counter)."""
