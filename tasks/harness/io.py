"""File helpers: atomic writes (temp path + rename), hashing, and each stage's meta.json."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP_PREFIX = ".tmp-"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a temp file in the same folder, then os.replace."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temp name in the same folder, so `dst` is never partial."""
    tmp = Path(dst).with_name(f"{_TMP_PREFIX}{Path(dst).name}")
    shutil.copy(src, tmp)
    tmp.replace(dst)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success it replaces `path` in one rename.

    A stage killed inside the block leaves `path` untouched (or absent) and only a `.tmp-*`
    sibling, which the next call removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{_TMP_PREFIX}{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{path.name}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file or folder if present (stale outputs before a stage starts)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5_tree(path: Path) -> str:
    """MD5 over a file, or over the relative names and contents of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(md5_file(f).encode())
    return h.hexdigest()


def check_onnx(path: Path) -> None:
    """Fail with one line naming `path` unless it is a complete, well-formed ONNX model.

    Runtimes report a truncated or foreign file as a long native stack (OpenVINO without the
    file's name); this reads it with the onnx package first and checks the graph.

    Raises:
        DataError: the file is missing, not ONNX, truncated or fails the ONNX checker.
    """
    import onnx
    from google.protobuf.message import DecodeError

    from tasks.harness.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except (DecodeError, onnx.checker.ValidationError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # onnxconverter-common's FP16 conversion leaves its input casts out of topological order:
        # every runtime here sorts the graph itself, so only that complaint is not an error
        if "must be topologically sorted" in first:
            return
        raise DataError(f"{path}: not a valid ONNX model (truncated or corrupt?): {first}") from e


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def meta(config: Any, inputs: dict[str, Path], packages: tuple[str, ...] = ()) -> dict:
    """The self-description of an artifact folder: resolved config, input hashes, versions."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return {
        "config": cfg,
        "inputs": {k: {"path": str(v), "md5": md5_tree(v)} for k, v in inputs.items()},
        "versions": versions("shrinkflow", "torch", "numpy", *packages),
    }
