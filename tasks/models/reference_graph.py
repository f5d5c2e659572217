"""The FP32 reference's folder (`artifacts/reference`): what the reference stage writes and
`evaluate@<target>` (and the benchmarks) read.

- `model.onnx`: the uncompressed model as ONNX, with the deployed graph's decode: the trained
  PyTorch model exported once, or for an imported ONNX (`model.family: onnx`) the imported
  graph as the export stage prepares it.
- `reference.json`: its facts: family, `imported`, input size, MACs and parameters of the
  uncompressed model, `size_mb` of its file (checkpoint or imported ONNX), source and MD5.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.harness.errors import DataError

ONNX = "model.onnx"
FACTS = "reference.json"
KEYS = ("family", "imported", "input_size", "macs", "params", "size_mb", "source")


def read(folder: Path) -> dict:
    """The facts in `folder/reference.json`, with `onnx`: the path of the reference graph.

    Raises:
        DataError: the folder has no reference graph or facts (the reference stage has not
            run there), or the facts lack a key.
    """
    folder = Path(folder)
    onnx_path, facts_path = folder / ONNX, folder / FACTS
    for path in (onnx_path, facts_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found (the reference stage writes it)")
    facts = json.loads(facts_path.read_text())
    missing = [k for k in KEYS if k not in facts]
    if missing:
        raise DataError(f"{facts_path}: missing {', '.join(missing)}; expected {', '.join(KEYS)}")
    return {**facts, "onnx": onnx_path}
