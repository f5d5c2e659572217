"""Graph surgery before a model goes to LiteRT (used by `tasks.engines.litert.convert`).

`split` cuts the exported ONNX in two: the backbone+head (every ancestor of a convolution, and
the convolutions) goes to onnx2tf; the in-graph decode after it stays ONNX and runs in ONNX
Runtime (onnx2tf cannot convert its TopK, and full-integer INT8 would put scores and box
arithmetic in int8). `at_batch_one` fixes a graph that computes shapes at run time (Ultralytics'
own ONNX export reads the batch and anchor count from Shape ops in the head) at batch 1 and
folds that arithmetic to constants with onnxsim, so the cut carries float maps only.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx.utils import Extractor

from tasks.harness.errors import ShrinkflowError


class Unconvertible(ShrinkflowError):
    """A model this target cannot convert (the stages report `skipped: <why>`)."""


def split(onnx_path: Path, head: Path, decode: Path) -> list[str]:
    """Cut `onnx_path` into the backbone+head (every ancestor of a Conv, and the Convs) and the
    decode after it. Returns the tensors at the cut in graph order: the head's outputs (one for
    the built-in detector's map; YOLO's per-scale class maps and DFL boxes are four). The
    decode's inputs are these, in this order, then the graph inputs it reads itself (YOLO's
    takes the batch size from the images' shape)."""
    model = onnx.load(str(onnx_path))
    producer = {out: node for node in model.graph.node for out in node.output}
    backbone: set[int] = set()
    stack = [n for n in model.graph.node if n.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if id(node) not in backbone:
            backbone.add(id(node))
            stack += [producer[i] for i in node.input if i in producer]
    inputs = [i.name for i in model.graph.input]
    cut: list[str] = []
    read: list[str] = []  # graph inputs the decode reads
    for node in model.graph.node:
        if id(node) in backbone:
            continue
        for name in node.input:
            if name in producer and id(producer[name]) in backbone and name not in cut:
                cut.append(name)
            elif name in inputs and name not in read:
                read.append(name)
    if not cut:
        raise Unconvertible(f"litert: {onnx_path}: no convolution's output reaches the decode")
    extractor = Extractor(model)
    decode_model = extractor.extract_model(cut + read, [o.name for o in model.graph.output])
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    types = {i.name: i.type.tensor_type.elem_type for i in decode_model.graph.input}
    if shapes := [name for name in cut if types[name] not in floats]:  # e.g. Shape -> Gather
        raise Unconvertible(
            f"litert: {onnx_path}: the decode reads shape values computed in the backbone "
            f"({', '.join(shapes)}); the LiteRT target converts heads that output float maps"
        )
    onnx.save(_plain_output_names(extractor.extract_model(inputs, cut)), str(head))
    onnx.save(decode_model, str(decode))
    return cut


def _plain_output_names(head: onnx.ModelProto) -> onnx.ModelProto:
    """The head with its outputs renamed `head_<k>` where a name is not one TensorFlow takes
    for an op (Ultralytics' exports name tensors `/model.22/dfl/conv/Conv_output_0`; onnx2tf
    then fails to write its SavedModel). The runner finds outputs by position, not name."""
    renames = {
        o.name: f"head_{k}"
        for k, o in enumerate(head.graph.output)
        if not re.fullmatch(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*", o.name)
    }
    for node in head.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for o in (*head.graph.output, *head.graph.value_info):
        o.name = renames.get(o.name, o.name)
    return head


def at_batch_one(onnx_path: Path, dst: Path) -> bool:
    """When the graph at `onnx_path` has Shape ops, write it to `dst` with its input fixed at
    batch 1 (its other axes as they are: the pipeline fixes the input size) and every value
    computed from shapes folded into constants (onnxsim), and return True; else False. The
    folded graph computes what the original computes at batch 1 (onnxsim compares them on
    random inputs and this raises when they differ)."""
    model = onnx.load(str(onnx_path))
    if not any(node.op_type == "Shape" for node in model.graph.node):
        return False
    import onnxsim

    image = model.graph.input[0]
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim]
    if not all(dims[1:]):
        raise Unconvertible(
            f"litert: {onnx_path}: input {image.name} has no fixed size ({dims[1:]}); "
            "LiteRT converts a fixed input size"
        )
    folded, ok = onnxsim.simplify(model, overwrite_input_shapes={image.name: [1, *dims[1:]]})
    if not ok:
        raise ShrinkflowError(f"litert: {onnx_path}: onnxsim's batch-1 graph does not match it")
    onnx.save(folded, str(dst))
    return True
