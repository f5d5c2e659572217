"""The project's checkpoints: {family, config, state_dict, categories, ...}, written atomically
and read with `torch.load(weights_only=True)` (no pickled objects: nothing in the file runs)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from tasks.harness.errors import DataError


def write_checkpoint(path: Path, ckpt: dict) -> None:
    """torch.save `ckpt` to `path` atomically (temp file, then rename)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict at `path` (weights_only load).

    Raises:
        DataError: the file is missing, not a torch checkpoint (truncated, foreign, or holding
            objects a weights-only load refuses), or not one of ours.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:  # noqa: BLE001  (torch raises several types; torch's advice to
        # turn weights_only off would run code from the file: never give it)
        raise DataError(
            f"{path}: not a readable Shrinkflow checkpoint ({type(e).__name__}); "
            "re-create it with the stage that writes it"
        ) from e
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= set(ckpt):
        raise DataError(f"{path}: not a Shrinkflow checkpoint (no config/state_dict)")
    return ckpt
