"""Reading ONNX graphs: value shapes, the image input, a copy at a fixed input size, shapes
ONNX Runtime finds where shape inference cannot, and MACs counted from the graph.

Shared by the imported-ONNX family (tasks/models/onnx_import.py) and any stage that reports the
cost of an ONNX model (`macs_and_params` works on every family's export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tasks.harness.errors import DataError
from tasks.preprocess.letterbox import input_wh

DECODE_PREFIX = "decode/"  # names of the appended decode's nodes (tasks/models/onnx_decode.py)


def dims(value_info: onnx.ValueInfoProto) -> list:
    """A value's shape: ints for static axes, the dim name (or '?') for symbolic ones."""
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def dtype(value_info: onnx.ValueInfoProto) -> str:
    return helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs (old exporters also list the initializers as graph inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def load(path: Path) -> onnx.ModelProto:
    from tasks.harness.io import check_onnx

    check_onnx(path)
    return onnx.load(str(path))


def fixed_size(model: onnx.ModelProto, size: int | tuple[int, int]) -> onnx.ModelProto:
    """A copy whose image input is (B, 3, h, w) for `size` = (w, h) or a side (batch kept
    as it is), re-inferred."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    axes = graph_inputs(model)[0].type.tensor_type.shape.dim
    w, h = input_wh(size)
    for axis, side in ((2, h), (3, w)):
        axes[axis].ClearField("dim_param")
        axes[axis].dim_value = side
    del model.graph.value_info[:]
    declared = {}
    for out in model.graph.output:  # symbolic output axes are re-derived below
        declared[out.name] = onnx.ValueInfoProto.FromString(out.SerializeToString())
        out.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for out in model.graph.output:  # what inference could not derive stays as declared
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(declared[out.name])
    return model


def run_shapes(
    model: onnx.ModelProto, size: int | tuple[int, int], path: Path
) -> dict[str, list[int]]:
    """Output shapes from one ONNX Runtime run on a (1, 3, h, w) zero image, `size` = (w, h)
    or a side (for graphs whose output shapes static inference cannot resolve, e.g. reshapes
    computed from Shape ops)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    w, h = input_wh(size)
    x = np.zeros((1, 3, h, w), np.float32)
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
    except Exception as e:  # noqa: BLE001  (ORT raises its own Fail/InvalidArgument types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{path}: does not run in ONNX Runtime on a (1,3,{h},{w}) image: {first}"
        ) from e
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def tensor_shapes(
    model: onnx.ModelProto, size: int, names: list[str], path: Path
) -> dict[str, list[int]]:
    """Shapes of intermediate tensors `names` from one ONNX Runtime run (batch 1)."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    graph_outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in graph_outputs
    )
    return run_shapes(probe, size, path)


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def macs_and_params(
    model: onnx.ModelProto | Path | str, input_size: int | tuple[int, int] | None = None
) -> tuple[int, int]:
    """MACs for one image and parameter count, read from the ONNX graph.

    Counted ops (shapes from ONNX shape inference at the input size; `input_size` is needed
    only when the file's height/width are symbolic): Conv = OC*OH*OW * KH*KW*IC/groups,
    ConvTranspose = IC*IH*IW * KH*KW*OC/groups, Gemm/MatMul = output elements * the reduced
    dimension; plus one add per output element for a bias, as torch-pruning's counter does.
    Elementwise ops, pooling and resizes are not counted. Parameters: the elements of the
    float initializers, the appended `decode/` constants left out.

    Raises:
        DataError: a counted op whose shapes inference cannot resolve (the file is named).
    """
    path = Path(model) if isinstance(model, (str, Path)) else Path("<model>")
    if isinstance(model, (str, Path)):
        model = load(path)
    _, _, h, w = dims(graph_inputs(model)[0])
    static = all(isinstance(d, int) and d > 0 for d in (h, w))
    size = (w, h) if static else input_size
    if size is None:
        raise DataError(f"{path}: symbolic input height/width; give the input size to count MACs")
    model = fixed_size(model, size)
    graph = model.graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    shapes = {v.name: dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}
    shapes.update(weights)

    counted = [
        n for n in graph.node
        if n.op_type in _WEIGHTED_OPS and not n.name.startswith(DECODE_PREFIX)
    ]  # fmt: skip
    unresolved = [
        name
        for n in counted
        for name in (n.input[0], n.output[0])
        if not shapes.get(name) or any(not isinstance(d, int) or d <= 0 for d in shapes[name][1:])
    ]
    if unresolved:  # e.g. reshapes computed from Shape ops: ask ONNX Runtime, one zero image
        shapes.update(tensor_shapes(model, size, unresolved, path))

    def shape(name: str, node: onnx.NodeProto) -> list[int]:
        s = shapes.get(name)
        if not s or any(not isinstance(d, int) or d <= 0 for d in s[1:]):
            raise DataError(f"{path}: cannot count MACs: {node.op_type} {node.name!r} tensor "
                            f"{name!r} has shape {s} after shape inference")  # fmt: skip
        return s

    macs = 0
    for node in counted:
        out = shape(node.output[0], node)
        bias = len(node.input) > 2 and bool(node.input[2])
        if node.op_type == "Conv":
            w = shape(node.input[1], node)
            macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x, w = shape(node.input[0], node), shape(node.input[1], node)
            macs += int(np.prod(x[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = shape(node.input[0], node)
            trans_a = any(a_.name == "transA" and a_.i for a_ in node.attribute)
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * a[0 if trans_a else 1]
        else:  # MatMul: (..., M, K) @ (..., K, N)
            a = shape(node.input[0], node)
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * a[-1]
        if bias and node.op_type != "MatMul":
            macs += int(np.prod(out[1:] if len(out) > 2 else out[-1:]))
    params = sum(
        int(np.prod(t.dims))
        for t in graph.initializer
        if not t.name.startswith(DECODE_PREFIX)
        and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    )
    return macs, params
