"""The numeric format (fp32, fp16, int8, ...) of the graph that is promoted, read from the ONNX
itself: never from the config or a report, which may say `int8` for a model whose quantization
was undone layer by layer. The *precision* KPI (true positives / detections) is another thing and
keeps its own name."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

# Ops that carry integer arithmetic in ONNX's QOperator and dynamic-quantization forms.
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
BITS = {
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "int8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "int16",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "int4",
}


def _dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every initializer and Constant output, by tensor name."""
    types = {t.name: t.data_type for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def numeric_format(onnx_path: Path) -> dict:
    """`numeric_format` of the graph and the counts it is derived from.

    int8 (or int16/int4, from the zero points' type) when the graph quantizes (QuantizeLinear /
    DequantizeLinear pairs, or QOperator/integer ops); else fp16 when most float weights are
    float16; else fp32. Returns {numeric_format, quantize_linear_nodes, dequantize_linear_nodes,
    integer_op_nodes}.
    """
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    q, dq = ops["QuantizeLinear"], ops["DequantizeLinear"]
    integer = sum(ops[o] for o in INTEGER_OPS)
    types = _dtypes(graph)
    if q or dq or integer:
        zero_points = {
            types.get(n.input[2])
            for n in graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
        }
        formats = sorted({BITS.get(t, "int8") for t in zero_points} or {"int8"})
        fmt = "+".join(formats)
    else:
        floats = Counter(t for t in types.values() if t in (TensorProto.FLOAT, TensorProto.FLOAT16))
        fmt = "fp16" if floats[TensorProto.FLOAT16] > floats[TensorProto.FLOAT] else "fp32"
    return {
        "numeric_format": fmt,
        "quantize_linear_nodes": q,
        "dequantize_linear_nodes": dq,
        "integer_op_nodes": integer,
    }
