"""The candidate as `promote` registers it: the stage's inputs, the packaged engines and the
serving spec (`detector.json`), the graph's numeric format, the version's tags, the registered
input example, and the champion run beside it on the same test split.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import onnx
from mlflow.tracking import MlflowClient

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import Kpi, Params
from tasks.harness.io import md5_file
from tasks.metrics.detection import predict
from tasks.promote import pyfunc
from tasks.promote.gates import Champion
from tasks.promote.numeric import numeric_format

log = logging.getLogger(__name__)
KPIS = get_args(Kpi)  # the KPI keys of evaluate's metrics.json
DELTAS = ("delta_map50", "delta_map50_95", "delta_precision", "delta_recall")


@dataclass
class Inputs:
    """What the stage reads (the paths dvc.yaml declares)."""

    evaluations: Path  # artifacts/evaluate (metrics.json per target)
    onnx: Path  # the deployable ONNX, artifacts/quantize/model.onnx
    engines: Path  # artifacts/build_engine (<target>/engine per target)
    quantize_report: Path  # calibration ids hash, deployed precision
    label_qa_report: Path
    export_metrics: Path  # parity_max_abs_diff
    manifest: Path  # label_qa manifest: the test split for the champion comparison


def input_size(onnx_path: Path) -> list[int]:
    """The exported graph's input [width, height]: images (N, 3, h, w)."""
    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type
    return [int(dims.shape.dim[3].dim_value), int(dims.shape.dim[2].dim_value)]


def package(params: Params, inputs: Inputs, manifest: dict, work: Path) -> tuple[Path, dict]:
    """Copy every engine built with status ok into `work/engines/`; the detector spec."""
    engines = work / "engines"
    for target in params.build_engine.targets:
        src = inputs.engines / target / "engine"
        if json.loads((src / "engine.json").read_text())["status"] == "ok":
            shutil.copytree(src, engines / target)
    cats = sorted(manifest["splits"]["test"]["categories"], key=lambda c: c["id"])
    spec = {
        "target": params.promote.target,
        "input_size": input_size(inputs.onnx),
        "categories": [{"id": c["id"], "name": c["name"]} for c in cats],
        "category_ids": [c["id"] for c in cats],
        "score_floor": params.export.score_floor,
        "build_engine": params.build_engine.model_dump(mode="json"),
    }
    return engines, spec


def champion_evidence(
    client: MlflowClient,
    name: str,
    version: str,
    candidate: pyfunc.DetectorModel,
    manifest: dict,
    work: Path,
) -> Champion:
    """Run the champion and the candidate on the same test split. The champion is rebuilt from
    its engine files and `detector.json` (pyfunc.load_files): none of its code runs."""
    source = client.get_model_version(name, version).source
    champ = pyfunc.load_files(
        source,
        work / "champion",
        tracking_uri=client.tracking_uri,
        what=f"{name} v{version} (the champion)",
    )
    rows = {}
    for who, model in (("challenger", candidate), ("champion", champ)):
        test = DetectionSet(manifest, "test", model.spec["input_size"])
        rows[who] = predict(model.runner, test)
    return Champion(version, test.coco, rows["challenger"], rows["champion"])


def graph_format(inputs: Inputs) -> dict:
    """The promoted graph's numeric format (numeric.py); a quantize report that says otherwise
    is logged, never believed."""
    fmt = numeric_format(inputs.onnx)
    said = json.loads(inputs.quantize_report.read_text()).get("precision")
    if said is not None and str(said) != fmt["numeric_format"]:
        log.warning(
            "%s says precision %s, but %s is %s (%d QuantizeLinear nodes): the graph wins",
            inputs.quantize_report,
            said,
            inputs.onnx,
            fmt["numeric_format"],
            fmt["quantize_linear_nodes"],
        )
    return fmt


def version_tags(
    metrics: dict, verdicts: list, lineage: dict, inputs: Inputs, params: Params, fmt: dict
) -> dict[str, str]:
    """Lineage, one tag per KPI (DESIGN.md spelling; `precision` is the KPI), the graph's
    `numeric_format`, the gate verdict and its reasons."""
    quant = json.loads(inputs.quantize_report.read_text())
    export = json.loads(inputs.export_metrics.read_text())
    failed = [f"{v.name}: {v.reason}" for v in verdicts if not v.passed]
    if verdicts:
        summary = "; ".join(failed) if failed else f"all {len(verdicts)} gates passed"
    else:
        summary = "no gates (promote.allow_no_gates: true)"
    return {
        **lineage,
        "calibration_md5": quant.get("calibration", {}).get("md5", "none"),
        "label_qa_report_md5": md5_file(inputs.label_qa_report),
        "onnx_md5": md5_file(inputs.onnx),
        "target": params.promote.target,
        "numeric_format": fmt["numeric_format"],
        "quantize_linear_nodes": str(fmt["quantize_linear_nodes"]),
        **{k: str(metrics[k]) for k in (*KPIS, *DELTAS) if k in metrics},  # p99: >= 200 runs
        "parity_max_abs_diff": str(export.get("parity_max_abs_diff")),
        "gate": "failed" if failed else "passed",
        "gate_reasons": summary,
        **{f"gate.{v.name}": f"{'passed' if v.passed else 'failed'}: {v.reason}" for v in verdicts},
    }


def example_image(manifest: dict) -> bytes:
    """The first test image's file: the registered model's input example."""
    im = manifest["splits"]["test"]["images"][0]
    return (Path(manifest["root"]) / im["file_name"]).read_bytes()
