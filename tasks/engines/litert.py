"""LiteRT (TFLite) on the CPU: ai-edge-litert's interpreter with the XNNPACK delegate.

Conversion (`convert`): the ONNX is cut in two (`tasks.engines.litert_graph`). The backbone+head
(every node up to the outputs of the convolutions) goes through onnx2tf (ONNX -> a Keras model)
and the TFLite converter (`_to_tflite`, set as onnx2tf sets it, without the SavedModel onnx2tf
would write first) to `model.tflite`: float32, float16 (float16 weights, float compute) or
full-integer INT8 (int8 activations, per-channel int8 weights, int8 input and outputs; activation
ranges from the TFLite converter's calibration on the images it is given). The in-graph decode
after the head (peak pooling, top-K, boxes; YOLO's anchors and NMS) is kept as the graph's own ONNX
nodes in `model.decode.onnx` and runs in ONNX Runtime on one thread: onnx2tf cannot convert its
TopK (it calls `int()` on the one-element K array, which numpy 2 refuses), and full-integer
quantization would put the scores and box arithmetic in int8. The head has one output per tensor
the decode reads (the built-in detector's one map; YOLO's three per-scale class maps and its DFL
boxes): the runner finds each by the name onnx2tf gave it, dequantizes it with its own scale and
zero point, and transposes it from onnx2tf's channels-last layout to the shape the decode expects.

Build (`LiteRt.build`): a `.tflite` beside the ONNX with the same stem (what `quantize` made for
this target, with its `.decode.onnx`) is taken as it is; otherwise the ONNX is converted to
float32. The interpreter is created with `build_engine.threads`; which ops the XNNPACK delegate
took and which fell back to the builtin kernels is read from the interpreter's nodes (a
delegate node replaces the partition between its inputs and outputs), and each convolution's
precision from its input tensor type. An INT8 model whose convolutions all run in float fails
the build.

The model is converted at batch 1 (LiteRT is batch-1 first): the runner calls it image by image.
A graph that computes shapes at run time (Ultralytics' own ONNX export takes the batch and anchor
count from Shape ops inside the head) is first fixed at batch 1 and its shape arithmetic folded
to constants by onnxsim (`at_batch_one`); its decode is then batch-1 too and runs per image.
Without the `litert` extra the target reports `skipped: <reason>`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from tasks.engines import Runner, register
from tasks.engines.litert_graph import Unconvertible, at_batch_one, split
from tasks.harness.config import BuildEngineCfg
from tasks.harness.errors import GateFailed, ShrinkflowError
from tasks.harness.signature import OUTPUTS

log = logging.getLogger(__name__)
REQUIRED = ("ai_edge_litert", "onnx2tf", "tensorflow")  # the `litert` extra
PRECISIONS = ("float32", "float16", "int8")
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf's name


def unavailable(modules: tuple[str, ...] = REQUIRED) -> str | None:
    """Why the LiteRT target cannot build here (`skipped: <reason>`), or None. Looks the
    modules up without importing them (TensorFlow takes seconds to import)."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            return f"skipped: {name} not installed; pip install '.[litert]'"
    return None


def convert(
    onnx_path: Path, dst: Path, precision: str, calibration: np.ndarray | None = None
) -> dict:
    """Convert `onnx_path` to `dst` (a .tflite; the decode goes to `<stem>.decode.onnx` beside
    it) at `precision`. `calibration` (N, 3, H, W) float32 images are required for int8.
    Returns conversion facts."""
    if precision not in PRECISIONS:
        raise ShrinkflowError(f"litert: unsupported precision {precision!r}; choose {PRECISIONS}")
    if precision == "int8" and calibration is None:
        raise ShrinkflowError("litert: full-integer INT8 needs calibration images")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnx2tf

    with tempfile.TemporaryDirectory(prefix="shrinkflow-litert-") as tmp:
        tmp = Path(tmp).resolve()  # onnx2tf runs in it (chdir below): no relative paths
        head, source = tmp / "head.onnx", tmp / "batch1.onnx"
        folded = at_batch_one(Path(onnx_path), source)
        cut = split(source if folded else onnx_path, head, tmp / "decode.onnx")
        shape = [
            d.dim_value for d in onnx.load(str(head)).graph.input[0].type.tensor_type.shape.dim
        ]
        name = onnx.load(str(head)).graph.input[0].name
        # onnx2tf checks its TF graph against ONNX Runtime on sample images, which it downloads
        # unless this file is in the working directory: give it ours (no download at run time).
        samples = calibration if calibration is not None else _samples(shape)
        np.save(tmp / SAMPLE_FILE, samples[:20].transpose(0, 2, 3, 1).astype(np.float32))
        printed = io.StringIO()  # onnx2tf prints the TF graph's signatures: keep for debug
        with contextlib.chdir(tmp), contextlib.redirect_stdout(printed):
            try:  # the Keras model only: its own TFLite path first writes a SavedModel (~90%
                # of its time on the built-in detector), which `_to_tflite` has no use for
                keras_model = onnx2tf.convert(
                    input_onnx_file_path=str(head),
                    output_folder_path=str(tmp / "out"),
                    overwrite_input_shape=[f"{name}:1,{','.join(str(d) for d in shape[1:])}"],
                    disable_model_save=True,
                    non_verbose=True,
                )
            except SystemExit as exc:  # onnx2tf reports its errors by sys.exit(1)
                raise ShrinkflowError(
                    f"{onnx_path}: onnx2tf could not convert it to LiteRT {precision} "
                    f"(exit {exc.code}): {printed.getvalue()[-500:].strip()}"
                ) from None
        nhwc = None if calibration is None else calibration.transpose(0, 2, 3, 1)
        tflite = _to_tflite(keras_model, precision, nhwc)
        log.debug("onnx2tf: %s", printed.getvalue())
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(tflite)
        shutil.copy(tmp / "decode.onnx", decode_path(dst))
    return {
        "precision": precision,
        "converter": "onnx2tf",
        "cut": cut,
        "batch1_folded": folded,
        "calibration_images": 0 if calibration is None else int(len(calibration)),
    }


def _to_tflite(keras_model, precision: str, calibration: np.ndarray | None) -> bytes:
    """The TFLite converter on onnx2tf's Keras model, set as onnx2tf sets it for the same file:
    float32; float16 weights; or full-integer INT8 (per-channel weights, int8 input and outputs,
    activation ranges from `calibration`, (N, H, W, C) float32 images used as they are, one at a
    time: the model is batch 1)."""
    import tensorflow as tf

    signature = [tf.TensorSpec(t.shape, t.dtype, t.name) for t in keras_model.inputs]
    fn = tf.function(lambda *inputs: keras_model(inputs), input_signature=signature)
    # no trackable object, as onnx2tf calls it: with one, the converter first saves a
    # SavedModel of it (what `convert` avoids: 15 s of the default teacher's 16 s)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    ops = (
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8
        if precision == "int8"
        else tf.lite.OpsSet.TFLITE_BUILTINS
    )
    converter.target_spec.supported_ops = [ops, tf.lite.OpsSet.SELECT_TF_OPS]
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def _samples(shape: list[int]) -> np.ndarray:
    """One deterministic image in [0, 1] of the model's input shape (1, C, H, W)."""
    return np.random.default_rng(0).random((1, *shape[1:]), dtype=np.float32)


def decode_path(tflite: Path) -> Path:
    return tflite.with_name(f"{tflite.stem}.decode.onnx")


def _interpreter(tflite: Path, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def _nodes(interpreter) -> list[tuple[str, list[int], list[int]]]:
    w = interpreter._interpreter  # the wrapper's node API (names, input and output tensors)
    return [
        (w.NodeName(i), [int(t) for t in w.NodeInputs(i)], [int(t) for t in w.NodeOutputs(i)])
        for i in range(w.NumNodes())
    ]


def delegation(interpreter) -> dict:
    """Ops taken by the XNNPACK delegate and ops left to the builtin kernels, by op name.

    After delegation the interpreter lists the model's nodes and then one DELEGATE node per
    partition; a partition is every model node on a path from its inputs to its outputs.
    """
    nodes = _nodes(interpreter)
    model = [i for i, (name, _, _) in enumerate(nodes) if name != "DELEGATE"]
    producer = {t: i for i in model for t in nodes[i][2]}
    taken: set[int] = set()
    partitions = 0
    for name, ins, outs in nodes:
        if name != "DELEGATE":
            continue
        partitions += 1
        stack = [producer[t] for t in outs if t in producer]
        while stack:
            i = stack.pop()
            if i not in taken:
                taken.add(i)
                stack += [producer[t] for t in nodes[i][1] if t in producer and t not in ins]
    return {
        "delegate": "XNNPACK" if partitions else None,
        "partitions": partitions,
        "xnnpack_ops": dict(Counter(nodes[i][0] for i in model if i in taken)),
        "fallback_ops": dict(Counter(nodes[i][0] for i in model if i not in taken)),
    }


def conv_precisions(interpreter) -> dict[str, int]:
    """Convolutions counted by the type of the activations they read (e.g. {'int8': 14})."""
    w = interpreter._interpreter
    counts: Counter = Counter()
    for name, ins, _ in _nodes(interpreter):
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"):
            counts[np.dtype(w.TensorType(ins[0], 0)).name.replace("float32", "f32")] += 1
    return dict(counts)


def model_precision(interpreter) -> str:
    """int8 when the model reads int8 activations, float16 with float16 weights, else float32."""
    w = interpreter._interpreter
    if interpreter.get_input_details()[0]["dtype"] == np.int8:
        return "int8"
    types = {np.dtype(w.TensorType(t, 0)).name for _, ins, _ in _nodes(interpreter) for t in ins}
    return "float16" if "float16" in types else "float32"


def check_int8(tflite: Path, interpreter, precisions: dict[str, int]) -> None:
    """A full-integer model whose convolutions all read float activations is an error."""
    if model_precision(interpreter) == "int8" and precisions.get("int8", 0) == 0:
        raise GateFailed(
            f"litert: {tflite} is full-integer INT8 but no convolution reads int8 activations "
            f"(interpreter reports {precisions}); the engine would silently run in float"
        )


def _layout(name: str, got: list[int], want: list) -> tuple[int, ...]:
    """The permutation that gives the TFLite output `got` (batch 1) the decode input's shape
    `want` (ONNX layout; its batch axis may be symbolic): onnx2tf's channels-last form put
    back ((1, H, W, C) -> (B, C, H, W), (1, N, C) -> (B, C, N)) where it fits, which is how
    onnx2tf writes a convolution's output even when all its axes are equal; else the tensor as
    it is (one onnx2tf left in the ONNX layout). Raises ShrinkflowError when neither fits."""
    rank = len(got)
    channels_last = [(0, rank - 1, *range(1, rank - 1))] if rank >= 3 else []
    for perm in [*channels_last, tuple(range(rank))]:
        if len(want) == rank and all(
            not isinstance(w, int) or w == got[p] for w, p in zip(want[1:], perm[1:], strict=True)
        ):
            return perm
    raise ShrinkflowError(
        f"litert: the head output for the decode input {name!r} has shape {got}, which is "
        f"neither the decode's {want} nor its channels-last form"
    )


def _by_position(interpreter) -> dict[int, dict]:
    """The model's outputs (tensor details) by their position k in onnx2tf's output list (the
    head ONNX's output order), read from the names the conversion gives them: the tensors'
    `Identity`, `Identity_<k>` (`_to_tflite` converts a concrete function: no signature) or,
    in a model converted from a SavedModel (onnx2tf's own full-integer file), the signature's
    `output_<k>`.
    Never from the interpreter's output order, which the TFLite converter shuffles (YOLO's
    full-integer model lists 1, 3, 0, 2). Raises ShrinkflowError on a name of neither form."""
    if interpreter.get_signature_list():
        named, pattern = interpreter.get_signature_runner().get_output_details(), r"output_(\d+)"
    else:
        named = {d["name"]: d for d in interpreter.get_output_details()}
        pattern = r"Identity(?:_(\d+))?"
    found = {}
    for name, details in named.items():
        if (match := re.fullmatch(pattern, name)) is None:
            raise ShrinkflowError(
                f"litert: output {name!r} is not named as onnx2tf names its outputs "
                f"({pattern}): cannot tell which head tensor it is"
            )
        found[int(match.group(1) or 0)] = details
    return found


def _head_outputs(interpreter, decode, tflite: Path) -> list[tuple[str, dict, tuple[int, ...]]]:
    """Each head tensor the decode reads (its ONNX name) with the TFLite output that holds it
    (tensor details: index, shape, scale and zero point) and the permutation back to the ONNX
    layout. The decode's first inputs are the head's outputs in `split`'s order: the k-th is
    onnx2tf's k-th output. Raises ShrinkflowError when the counts or shapes disagree."""
    inputs, outputs = decode.get_inputs(), _by_position(interpreter)
    if sorted(outputs) != list(range(len(outputs))) or len(outputs) > len(inputs):
        raise ShrinkflowError(
            f"litert: {tflite}: its outputs {sorted(outputs)} are not the decode's "
            f"inputs {[i.name for i in inputs]}"
        )
    return [
        (i.name, outputs[k], _layout(i.name, [int(d) for d in outputs[k]["shape"]], i.shape))
        for k, i in enumerate(inputs[: len(outputs)])
    ]


def runner(tflite: Path, threads: int) -> Runner:
    """(B, 3, H, W) float32 -> the four decode outputs; the head runs image by image, each
    of its outputs dequantized with its own scale and zero point (full-integer INT8) and put
    back in the decode's layout."""
    import onnxruntime as ort

    interpreter = _interpreter(tflite, threads)
    inp = interpreter.get_input_details()[0]
    in_scale, in_zero = inp["quantization"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    decode = ort.InferenceSession(
        str(decode_path(tflite)), opts, providers=["CPUExecutionProvider"]
    )
    outputs = _head_outputs(interpreter, decode, tflite)
    images = [i.name for i in decode.get_inputs()[len(outputs) :]]  # read for their shape
    per_image = decode.get_inputs()[0].shape[0] == 1  # folded at batch 1 (`at_batch_one`)

    def decoded(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not per_image:
            return decode.run(OUTPUTS, feeds)
        n = len(next(iter(feeds.values())))
        parts = [decode.run(OUTPUTS, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def run(x: np.ndarray):
        heads: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in outputs}
        for image in x.transpose(0, 2, 3, 1):  # NHWC, as onnx2tf converts
            if inp["dtype"] == np.int8:
                image = np.clip(np.round(image / in_scale) + in_zero, -128, 127)
            interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
            interpreter.invoke()
            for name, out, _ in outputs:
                y = interpreter.get_tensor(out["index"])
                scale, zero = out["quantization"]
                heads[name].append((y.astype(np.float32) - zero) * scale if scale else y)
        feeds = {
            name: np.ascontiguousarray(np.concatenate(heads[name]).transpose(perm), np.float32)
            for name, _, perm in outputs
        }
        return decoded(feeds | dict.fromkeys(images, x))

    return run


class LiteRt:
    name = "litert"
    engine_file = "model.tflite"
    takes_batch = False  # converted at batch 1: no throughput figure

    def build(self, onnx_path: Path, out_dir: Path, cfg: BuildEngineCfg) -> dict:
        if reason := unavailable():
            return {"status": reason}
        import ai_edge_litert

        made = Path(onnx_path).with_suffix(".tflite")
        dst = out_dir / self.engine_file
        if made.exists():  # what quantize made for this target, with its facts beside it
            shutil.copy(made, dst)
            shutil.copy(decode_path(made), decode_path(dst))
            recorded = made.with_suffix(".json")
            facts = {"source": made.name}
            if recorded.exists():
                facts["quantize"] = json.loads(recorded.read_text())
        else:
            try:
                facts = {"source": Path(onnx_path).name, **convert(onnx_path, dst, "float32")}
            except Unconvertible as e:
                return {"status": f"skipped: {e}"}
        interpreter = _interpreter(dst, cfg.threads)
        precisions = conv_precisions(interpreter)
        check_int8(dst, interpreter, precisions)
        return {
            "status": "ok",
            **facts,
            "precision": model_precision(interpreter),
            "threads": cfg.threads,
            "batch": 1,
            "input_shape": [int(d) for d in interpreter.get_input_details()[0]["shape"]],
            "conv_precisions": precisions,
            **delegation(interpreter),
            "decode": "ONNX Runtime (the graph's own decode nodes, 1 thread)",
            "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
        }

    def load(self, out_dir: Path, cfg: BuildEngineCfg) -> Runner:
        return runner(out_dir / self.engine_file, cfg.threads)


register(LiteRt())
