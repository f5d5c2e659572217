"""What INT8 each engine target accepts, and so which model `quantize` makes for it.

QDQ targets take an ONNX with QuantizeLinear/DequantizeLinear pairs (per-channel symmetric int8
weights); they differ in the activation type. LiteRT takes no QDQ model: its full-integer INT8
is made by the TFLite converter (int8 activations and weights throughout).
"""

from __future__ import annotations

LITERT = "litert"  # the requirement "full-integer INT8 by the TFLite converter"
ACCEPTS: dict[str, tuple[str, ...]] = {
    # ORT's CPU kernels fuse u8 activations with s8 weights (QLinearConv); s8 activations do not
    "onnxruntime": ("quint8",),
    "openvino": ("quint8", "qint8"),  # either; u8 first, so it shares ONNX Runtime's model
    # explicit quantization: symmetric s8 activations and weights (zero point 0)
    "tensorrt": ("qint8",),
    "litert": (LITERT,),
}


def requirement(target: str, activation_type: str) -> str:
    """The INT8 model `target` is built from: "quint8" or "qint8" QDQ, or "litert".

    `activation_type` is `quantize.activation_type`: "auto" gives each target the first type
    it accepts; "quint8"/"qint8" forces that type on every QDQ target (see `conflicts`).
    """
    accepts = ACCEPTS[target]
    if activation_type == "auto" or accepts == (LITERT,):
        return accepts[0]
    return activation_type


def conflicts(activation_type: str, targets: list[str]) -> list[str]:
    """The targets that cannot take a QDQ model with `activation_type` activations."""
    return [t for t in targets if requirement(t, activation_type) not in ACCEPTS[t]]


def qdq_types(activation_type: str, targets: list[str]) -> list[str]:
    """The distinct QDQ activation types `targets` need, the first being the deployable
    `model.onnx`'s (quint8 when nothing asks for a QDQ model)."""
    types = {requirement(t, activation_type) for t in targets} - {LITERT}
    fallback = "quint8" if activation_type == "auto" else activation_type
    return sorted(types, key=lambda t: t != "quint8") or [fallback]
