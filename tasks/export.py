"""Stage `export`: the trained model, in eval mode, to ONNX with decoding inside the graph.

Outputs `num_detections, boxes, scores, classes` with a dynamic batch axis; simplified with onnxsim
(onnxslim as the alternative), checked by onnx.checker, and compared against PyTorch on test images:
`parity_max_abs_diff` (scores and boxes of the detections both report) is gated by
`export.parity_tolerance`.
"""

from __future__ import annotations

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
from tasks.model import Detector, DetectorWithDecode, load_checkpoint

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


def to_onnx(model: Detector, cfg: ExportCfg, path: Path) -> dict:
    """Export `model` (+ decode) to `path` atomically. Returns export facts for metrics."""
    wrapped = DetectorWithDecode(model.eval(), cfg.max_detections, cfg.score_floor).eval()
    size = model.cfg.input_size
    example = torch.rand(2, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            wrapped, (example,), str(raw_path), dynamo=True, opset_version=cfg.opset,
            input_names=["images"], output_names=OUTPUTS,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
            verbose=False,
        )
        raw = onnx.load(str(raw_path))
    simplified = _simplify(raw, cfg.simplifier)
    onnx.checker.check_model(simplified, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".tmp-{path.name}")
    onnx.save(simplified, str(tmp_path))
    tmp_path.replace(path)
    return {
        "opset": cfg.opset, "simplifier": cfg.simplifier,
        "nodes_raw": len(raw.graph.node), "nodes": len(simplified.graph.node),
        "size_mb": path.stat().st_size / 2**20,
    }


def parity(model: Detector, onnx_path: Path, images: np.ndarray, cfg: ExportCfg) -> dict:
    """Compare ONNX Runtime (no graph rewrites) against PyTorch eager on `images` (B, 3, S, S).

    The decoded outputs are compared over the detections both sides report; a differing
    detection count or class is counted separately.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUTS, {"images": images})
    wrapped = DetectorWithDecode(model.eval(), cfg.max_detections, cfg.score_floor).eval()
    with torch.inference_mode():
        ref = [t.numpy() for t in wrapped(torch.from_numpy(images))]
    diff, count_mismatch, class_mismatch = 0.0, 0, 0
    for i in range(images.shape[0]):
        n = int(min(got[0][i], ref[0][i]))
        count_mismatch += int(got[0][i] != ref[0][i])
        class_mismatch += int((got[3][i, :n] != ref[3][i, :n]).sum())
        for o in (1, 2):  # boxes, scores
            if n:
                diff = max(diff, float(np.abs(got[o][i, :n] - ref[o][i, :n]).max()))
    return {"parity_max_abs_diff": diff, "parity_count_mismatch": count_mismatch,
            "parity_class_mismatch": class_mismatch, "parity_images": int(images.shape[0])}


def run(cfg: ExportCfg, *, checkpoint: Path, manifest: dict, out: Path) -> dict:
    """Export the checkpoint to `out` and check parity. Raises GateFailed past the tolerance."""
    model, _ = load_checkpoint(checkpoint)
    facts = to_onnx(model, cfg, out)
    test = DetectionSet(manifest, "test", model.cfg.input_size)
    images = test.batch(slice(0, cfg.parity_images))
    result = {**facts, **parity(model, out, images, cfg)}
    log.info("ONNX parity: max |diff| %.2e over %d images", result["parity_max_abs_diff"],
             result["parity_images"])
    if result["parity_max_abs_diff"] > cfg.parity_tolerance or result["parity_class_mismatch"]:
        remove(out)
        raise GateFailed(
            f"ONNX parity: max |onnx - torch| = {result['parity_max_abs_diff']:.3g} "
            f"(export.parity_tolerance={cfg.parity_tolerance:g}), "
            f"{result['parity_class_mismatch']} class mismatches"
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
        result = run(cfg, checkpoint=checkpoint, manifest=json.loads(manifest.read_text()),
                     out=out / "model.onnx")
        write_json(out / "meta.json", meta(cfg, {"checkpoint": checkpoint},
                                           ("onnx", "onnxsim", "onnxslim", "onnxruntime")))
        write_json(out / "metrics.json", result)
        ctx.log_metrics(result)
        ctx.log_artifact(out / "model.onnx", "model")


if __name__ == "__main__":
    app()
