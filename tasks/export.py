"""Stage `export`: the trained model, in eval mode, to ONNX with decoding inside the graph.

BatchNorm is folded into the convolutions first. Outputs
`num_detections, boxes, scores, classes` with a dynamic batch axis; simplified with onnxsim
(onnxslim as the alternative), checked by onnx.checker, and compared against PyTorch on test images:
`parity_max_abs_diff` (scores and boxes of the detections both report) is gated by
`export.parity_tolerance`.
"""

from __future__ import annotations

import ast
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import typer

from tasks.cli import stage_entry
from tasks.coco import DetectionSet
from tasks.config import ExportCfg
from tasks.errors import GateFailed
from tasks.io import meta, remove, write_json
from tasks.model import Detector, DetectorWithDecode, fold_batchnorm, load_checkpoint

log = logging.getLogger(__name__)
OUTPUTS = ["num_detections", "boxes", "scores", "classes"]


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


def _name_convs_by_module(model: onnx.ModelProto) -> None:
    """Rename each Conv node to its PyTorch block path ("stem", "stages.0.1", "out"), from the
    exporter's name-scope metadata, so quantization reports and exclusions speak model terms."""
    for node in model.graph.node:
        scopes = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None
        )
        if node.op_type != "Conv" or scopes is None:
            continue
        module = ast.literal_eval(scopes)[-2]  # e.g. 'model.stages.0.1.0'
        path = module.removeprefix("model.")
        node.name = path if path == "out" else path.removesuffix(".0")


def to_onnx(model: Detector, cfg: ExportCfg, path: Path) -> dict:
    """Fold BatchNorm, export `model` (+ decode) to `path` atomically. Returns export facts.

    The parity check compares this graph with the *unfolded* PyTorch model, so it also verifies
    that folding changed nothing beyond float rounding.
    """
    folded, folds = fold_batchnorm(model)
    wrapped = DetectorWithDecode(folded, cfg.max_detections, cfg.score_floor).eval()
    size = model.cfg.input_size
    example = torch.rand(2, 3, size, size)
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


def parity(model: Detector, onnx_path: Path, images: np.ndarray, cfg: ExportCfg) -> dict:
    """Compare ONNX Runtime (no graph rewrites) against PyTorch eager on `images` (B, 3, S, S).

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
    wrapped = DetectorWithDecode(model.eval(), cfg.max_detections, cfg.score_floor).eval()
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


def run(cfg: ExportCfg, *, checkpoint: Path, manifest: dict, out: Path) -> dict:
    """Export the checkpoint to `out` and check parity. Raises GateFailed past the tolerance."""
    model, _ = load_checkpoint(checkpoint)
    # The exporter warns about every torchvision op it cannot find; this model uses none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    facts = to_onnx(model, cfg, out)
    test = DetectionSet(manifest, "test", model.cfg.input_size)
    images = test.batch(slice(0, cfg.parity_images))
    result = {**facts, **parity(model, out, images, cfg)}
    log.info(
        "ONNX parity: max |diff| %.2e over %d images",
        result["parity_max_abs_diff"],
        result["parity_images"],
    )
    if result["parity_max_abs_diff"] > cfg.parity_tolerance:
        remove(out)
        raise GateFailed(
            f"ONNX parity: max |onnx - torch| = {result['parity_max_abs_diff']:.3g} exceeds "
            f"export.parity_tolerance={cfg.parity_tolerance:g}"
        )
    return result


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    checkpoint: Path = typer.Option(Path("artifacts/train/model.pt")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/export")),
) -> None:
    """Export to ONNX, simplify, check, and gate on parity with PyTorch."""
    with stage_entry("export", params) as ctx:
        cfg = ctx.params.export
        ctx.log_params(cfg)
        for stale in ("model.onnx", "metrics.json", "meta.json"):
            remove(out / stale)
        result = run(
            cfg,
            checkpoint=checkpoint,
            manifest=json.loads(manifest.read_text()),
            out=out / "model.onnx",
        )
        write_json(
            out / "meta.json",
            meta(cfg, {"checkpoint": checkpoint}, ("onnx", "onnxsim", "onnxslim", "onnxruntime")),
        )
        write_json(out / "metrics.json", result)
        ctx.log_metrics(result)
        ctx.log_artifact(out / "model.onnx", "model")


if __name__ == "__main__":
    app()
