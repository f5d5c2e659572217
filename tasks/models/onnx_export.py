"""A PyTorch model of any family to ONNX with decoding inside the graph, and its parity check.

BatchNorm is folded into the convolutions first (by the family's `deployable`). Outputs
`num_detections, boxes, scores, classes` with a dynamic batch axis; simplified with onnxsim
(onnxslim as the alternative), checked by onnx.checker; Conv nodes are named after their
PyTorch module paths. `export_checkpoint` (checkpoint -> ONNX -> parity on test images) and
`prepare_imported` (an imported ONNX, checked, decode + NMS appended) are what the export and
reference stages run; `to_onnx` is also used by quantize's QAT, variants and the benchmarks.
"""

from __future__ import annotations

import ast
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import ExportCfg
from tasks.harness.errors import GateFailed
from tasks.models import OUTPUTS, ModelAdapter, load_checkpoint
from tasks.models.config import ModelCfg
from tasks.models.nms import ONNX_TRANSLATIONS
from tasks.preprocess.letterbox import input_wh

PARITY_KEYS = ("parity_max_abs_diff", "parity_count_mismatch", "parity_images")  # `parity`'s


def _simplify(model: onnx.ModelProto, simplifier: str) -> onnx.ModelProto:
    if simplifier == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise GateFailed("onnxsim could not validate the simplified model")
        return simplified
    if simplifier == "onnxslim":
        import onnxslim

        return onnxslim.slim(model)
    return model


def _module_path(scopes: list[str]) -> str:
    """The module path of a node from the exporter's name scopes, whose entries are either
    full paths ('model.stages.0') or attribute names relative to the last ('conv'); the last
    entry is the op itself."""
    path = ""
    for entry in scopes[:-1]:
        if not entry:
            continue
        path = entry if not path or entry.startswith(f"{path}.") else f"{path}.{entry}"
    return path


def _name_convs_by_module(model: onnx.ModelProto) -> None:
    """Rename each Conv node to its PyTorch module path, without the deployable wrapper's
    `model.` ("stem", "stages.0.1", "out"; a Conv-BN-ReLU block's conv at index 0 is named
    after the block), from the exporter's name-scope metadata, so quantization reports and
    exclusions speak model terms. Names that would repeat keep the exporter's."""
    names: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None
        )
        if node.op_type != "Conv" or scopes is None:
            continue
        path = _module_path(ast.literal_eval(scopes)).removeprefix("model.")
        if path:
            names.setdefault(path if path == "out" else path.removesuffix(".0"), []).append(node)
    for name, nodes in names.items():
        if len(nodes) == 1:
            nodes[0].name = name


def _batchnorms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def to_onnx(adapter: ModelAdapter, model: torch.nn.Module, cfg: ExportCfg, path: Path) -> dict:
    """Fold BatchNorm, export `model` (+ the family's decode) to `path` atomically. Returns
    export facts.

    The parity check compares this graph with the *unfolded* PyTorch model, so it also verifies
    that folding changed nothing beyond float rounding.
    """
    wrapped = adapter.deployable(model, cfg.max_detections, cfg.score_floor)
    folds = _batchnorms(model) - _batchnorms(wrapped)
    w, h = input_wh(adapter.input_size(model))
    example = torch.rand(2, 3, h, w)  # NCHW: the graph's input is (N, 3, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            wrapped,
            (example,),
            str(raw_path),
            dynamo=True,
            opset_version=cfg.opset,
            input_names=["images"],
            output_names=OUTPUTS,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            custom_translation_table=ONNX_TRANSLATIONS,
            verbose=False,
        )
        raw = onnx.load(str(raw_path))
    _name_convs_by_module(raw)
    simplified = _simplify(raw, cfg.simplifier)
    onnx.checker.check_model(simplified, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".tmp-{path.name}")
    onnx.save(simplified, str(tmp_path))
    tmp_path.replace(path)
    return {
        "bn_folded": folds,
        "opset": cfg.opset,
        "simplifier": cfg.simplifier,
        "nodes_raw": len(raw.graph.node),
        "nodes": len(simplified.graph.node),
        "size_mb": path.stat().st_size / 2**20,
    }


def _match_diff(boxes_a, scores_a, classes_a, n_a, boxes_b, scores_b, classes_b) -> float:
    """Largest difference between each of the first `n_a` detections of A and its closest
    same-class detection anywhere in B's top-K (near-equal scores may swap places)."""
    if n_a == 0:
        return 0.0
    a = np.concatenate([boxes_a[:n_a], scores_a[:n_a, None]], axis=1)  # (n, 5)
    classes_a = classes_a[:n_a]
    b = np.concatenate([boxes_b, scores_b[:, None]], axis=1)  # (K, 5)
    d = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2)  # (n, K)
    d[classes_a[:, None] != classes_b[None, :]] = np.inf
    return float(d.min(axis=1).max())


def parity(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    onnx_path: Path,
    images: np.ndarray,
    cfg: ExportCfg,
) -> dict:
    """Compare ONNX Runtime (no graph rewrites) against PyTorch eager on `images` (B, 3, H, W).

    Every detection scoring at least `parity_min_score` on one side is matched to the closest
    same-class detection in the other side's top-K; `parity_max_abs_diff` is the largest
    box-coordinate or score gap. (Below that score, peaks on flat heatmap plateaus can split or
    merge on 1e-7 differences: both outputs are right, they are just not comparable one to one.)
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUTS, {"images": images})
    wrapped = adapter.deployable(model.eval(), cfg.max_detections, cfg.score_floor, fold=False)
    with torch.inference_mode():
        ref = [t.numpy() for t in wrapped(torch.from_numpy(images))]
    diff, count_mismatch = 0.0, 0
    for i in range(images.shape[0]):
        count_mismatch += int(got[0][i] != ref[0][i])
        for a, b in ((ref, got), (got, ref)):
            n = int((a[2][i] >= cfg.parity_min_score).sum())  # scores are sorted descending
            diff = max(diff, _match_diff(a[1][i], a[2][i], a[3][i], n, b[1][i], b[2][i], b[3][i]))
    return {
        "parity_max_abs_diff": diff,
        "parity_count_mismatch": count_mismatch,
        "parity_images": int(images.shape[0]),
    }


def export_checkpoint(
    checkpoint: Path,
    manifest: dict,
    cfg: ExportCfg,
    out: Path,
    model_cfg: ModelCfg | None = None,
) -> tuple[dict, ModelAdapter, torch.nn.Module]:
    """Export a project checkpoint to `out` (`to_onnx`) and compare it with PyTorch on the first
    `cfg.parity_images` test images of `manifest` (`parity`).

    Returns (facts, adapter, model): `to_onnx`'s facts with `parity`'s, and the loaded model (in
    eval mode). The caller decides what a parity gap past `cfg.parity_tolerance` means
    (`parity_gap` says whether there is one).
    """
    adapter, model, _ = load_checkpoint(checkpoint, model_cfg)
    # The exporter warns about every torchvision op it cannot find; this model uses none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    facts = to_onnx(adapter, model, cfg, out)
    test = DetectionSet(manifest, "test", adapter.input_size(model))
    facts |= parity(adapter, model, out, test.batch(slice(0, cfg.parity_images)), cfg)
    return facts, adapter, model


def parity_gap(facts: dict, cfg: ExportCfg) -> str | None:
    """Why `facts` (from `export_checkpoint`) fail `export.parity_tolerance`, or None."""
    diff = facts["parity_max_abs_diff"]
    if diff <= cfg.parity_tolerance:
        return None
    return (
        f"ONNX parity: max |onnx - torch| = {diff:.3g} exceeds "
        f"export.parity_tolerance={cfg.parity_tolerance:g}"
    )


def prepare_imported(
    adapter: ModelAdapter,
    out: Path,
    manifest: dict,
    cfg: ExportCfg,
    input_size: int | tuple[int, int],
) -> dict:
    """An imported ONNX (`model.family: onnx`) as the pipeline deploys it, written to `out`:
    checked, its decode + NMS appended for the manifest's classes at `input_size`
    (tasks/models/onnx_import.py). Returns the adapter's facts (MACs, parameters, ...)."""
    return adapter.prepare(
        out,
        num_classes=len(manifest["splits"]["train"]["categories"]),
        input_size=input_size,
        max_detections=cfg.max_detections,
        score_floor=cfg.score_floor,
    )
