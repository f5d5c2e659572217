"""Stage `promote`: judge the candidate with the gates of `params.yaml`, register it as a version
of the MLflow registered model, and move the aliases.

The stage refuses to run without its own `promote` section in params.yaml, and with no gates
unless `promote.allow_no_gates: true` says so. Every candidate becomes a version with alias
`challenger`, once: a candidate whose ONNX and serving spec (target, engine settings; tag
`candidate_md5`) are registered already is judged again as that version. `champion` moves to it
only when every gate passes, by a compare-and-set on the champion read at the start
(tasks/promote/registry.py), and the champion it replaces becomes `previous`. The version carries
the pyfunc model (ONNX + the built engines, as models-from-code), the model card as its
description, lineage tags, one tag per KPI, `numeric_format` (read from the graph), `gate` and
`gate_reasons`. The champion is compared from its engine files, never by loading its code or a
pickle. Everything is prepared locally first; a failure after the version was created deletes it
again. `artifacts/promote/decision.json` (a DVC metrics file) holds the verdicts.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import onnx
import typer
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.datasets.coco import DetectionSet
from tasks.harness.config import Kpi, Params
from tasks.harness.errors import ConfigError, ShrinkflowError
from tasks.harness.io import md5_file, remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.metrics.detection import predict
from tasks.promote import card, pyfunc
from tasks.promote.gates import Champion, Evidence, evaluate_gates
from tasks.promote.numeric import numeric_format
from tasks.promote.registry import (
    AliasLedger,
    ChampionMoved,
    candidate_md5,
    find_candidate,
    register_version,
    unregister,
    update_version,
)

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


def require_gates(params: Params) -> None:
    """Refuse built-in defaults and an empty gate list that nobody asked for: with no gates
    every candidate would become champion.

    Raises:
        ConfigError: params.yaml has no `promote` section, or no gates and no
            `promote.allow_no_gates: true`.
    """
    if "promote" not in params.model_fields_set:
        raise ConfigError(
            "params.yaml: promote: section missing; promote decides what becomes champion and "
            "does not run on built-in defaults (add a promote section with its gates)"
        )
    if not params.promote.gates and not params.promote.allow_no_gates:
        raise ConfigError(
            "params.yaml: promote.gates: empty: every candidate would become champion; list "
            "gates, or set promote.allow_no_gates: true to promote without any"
        )


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
        **{k: str(metrics[k]) for k in (*KPIS, *DELTAS)},
        "parity_max_abs_diff": str(export.get("parity_max_abs_diff")),
        "gate": "failed" if failed else "passed",
        "gate_reasons": summary,
        **{f"gate.{v.name}": f"{'passed' if v.passed else 'failed'}: {v.reason}" for v in verdicts},
    }


def run(
    params: Params,
    *,
    inputs: Inputs,
    out: Path,
    client: MlflowClient,
    run_id: str,
    lineage: dict[str, str],
) -> dict:
    """Judge, register and (maybe) promote the candidate; write decision.json and the card.

    `run_id` is the MLflow run the model artifacts are logged to; `lineage` the tags that tie
    the version to its code, data and pipeline run. Returns the decision.

    Raises:
        ConfigError: no promote section, or no gates without `promote.allow_no_gates`.
    """
    require_gates(params)
    cfg, name = params.promote, params.project.registered_model
    metrics = json.loads((inputs.evaluations / cfg.target / "metrics.json").read_text())
    if metrics["status"] != "ok":
        raise ShrinkflowError(
            f"evaluate@{cfg.target}: {metrics['status']}: nothing to promote "
            "(set promote.target to an engine that runs here)"
        )
    manifest = json.loads(inputs.manifest.read_text())
    fmt = graph_format(inputs)
    ledger = AliasLedger(client, name, lock_timeout_s=cfg.lock_timeout_s)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-promote-") as tmp:
        work = Path(tmp)
        engines, spec = package(params, inputs, manifest, work)
        candidate = pyfunc.DetectorModel().load(spec, engines)
        start = ledger.snapshot()  # the champion the compare-and-set expects at the end
        identity = candidate_md5(md5_file(inputs.onnx), spec)
        existing = find_candidate(client, name, identity)
        evidence = Evidence(metrics)
        champion_tags = None
        if start.champion:
            champion_tags = client.get_model_version(name, start.champion).tags
            if any(g.kind == "non_regression" for g in cfg.gates):
                evidence.champion = champion_evidence(
                    client, name, start.champion, candidate, manifest, work
                )
        verdicts = evaluate_gates(cfg.gates, evidence)
        passed = all(v.passed for v in verdicts)
        tags = {
            **version_tags(metrics, verdicts, lineage, inputs, params, fmt),
            "candidate_md5": identity,
        }
        text = card.render(
            name=name,
            metrics=metrics,
            verdicts=verdicts,
            tags=tags,
            champion=(start.champion, champion_tags) if start.champion else None,
            params={
                k: params.model_dump(mode="json")[k]
                for k in ("promote", "quantize", "prune", "distill", "train")
            },
        )
        write_text(work / "model_card.md", text)
        if existing is None:
            pyfunc.save(
                work / "model",
                onnx_path=inputs.onnx,
                engines=engines,
                spec=spec,
                card=work / "model_card.md",
                example_image=example_image(manifest),
            )
            # Everything is prepared: only now does the registry change.
            client.log_artifacts(run_id, str(work / "model"), "model")
            source = f"{client.get_run(run_id).info.artifact_uri}/model"
            version, created = register_version(
                client, name, source=source, run_id=run_id, tags=tags, description=text
            )
        else:
            version = existing
            log.info(
                "%s v%s holds this ONNX already: judged again, not registered twice", name, version
            )
        try:  # a failed alias transaction restores the aliases it moved (registry.py)
            outcome, note = move_aliases(
                ledger,
                version,
                passed,
                start.champion,
                run_id,
                client.get_model_version(name, version).tags.get("review"),
            )
        except BaseException:
            if existing is None:
                try:
                    unregister(client, name, version, created)
                except Exception as e:  # noqa: BLE001  (the original error matters more)
                    log.error("could not delete %s v%s after the failure: %s", name, version, e)
            raise
        if existing is not None:
            update_version(client, name, version, tags=tags, description=text)
        client.set_model_version_tag(name, version, "promotion", outcome)
    decision = {
        "registered_model": name,
        "version": int(version),
        "new_version": existing is None,
        "target": cfg.target,
        "run_id": run_id,
        "passed": passed,
        "champion": outcome == "champion",
        "outcome": outcome,
        "note": note,
        "champion_before": start.champion,
        "numeric_format": fmt["numeric_format"],
        "quantize_linear_nodes": fmt["quantize_linear_nodes"],
        "gates": {v.name: v.as_dict() for v in verdicts},
        "reasons": [f"{v.name}: {v.reason}" for v in verdicts if not v.passed],
        "kpis": {k: metrics[k] for k in (*KPIS, *DELTAS)},
    }
    write_text(out / "model_card.md", text)
    write_json(out / "decision.json", decision)
    return decision


def move_aliases(
    ledger: AliasLedger,
    version: str,
    passed: bool,
    champion: str | None,
    run_id: str,
    review: str | None = None,
) -> tuple[str, str]:
    """`challenger` always; `champion` (old one -> `previous`) only when the gates passed and the
    champion is still the one read at the start. A version a reviewer rejected (`review`) keeps
    its aliases as they are. Returns (outcome, note)."""
    if review == "rejected":
        return "rejected", f"v{version} was rejected by a reviewer: aliases left as they are"
    if passed and champion == version:
        try:
            ledger.move(
                {"challenger": version},
                action="candidate",
                version=version,
                reason="all gates passed; the champion already",
                expect_champion=champion,
                run_id=run_id,
            )
            return "champion", f"v{version} is the champion already"
        except ChampionMoved as e:
            note = f"gates passed but {e}"
    elif passed:
        changes = {"challenger": version, "champion": version}
        if champion:
            changes["previous"] = champion
        try:
            ledger.move(
                changes,
                action="promote",
                version=version,
                reason="all gates passed",
                expect_champion=champion,
                run_id=run_id,
            )
            return (
                "champion",
                f"champion v{champion} -> v{version}" if champion else "first champion",
            )
        except ChampionMoved as e:
            note = f"gates passed but {e}"
    elif champion == version:
        note = f"gates failed; v{version} stays champion (`shrinkflow rollback` demotes it)"
    else:
        note = "gates failed"
    ledger.move(
        {"challenger": version}, action="candidate", version=version, reason=note, run_id=run_id
    )
    return "challenger", note


def example_image(manifest: dict) -> bytes:
    """The first test image's file: the registered model's input example."""
    im = manifest["splits"]["test"]["images"][0]
    return (Path(manifest["root"]) / im["file_name"]).read_bytes()


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    evaluations: Path = typer.Option(Path("artifacts/evaluate")),
    onnx_path: Path = typer.Option(Path("artifacts/quantize/model.onnx"), "--onnx"),
    engines: Path = typer.Option(Path("artifacts/build_engine")),
    quantize_report: Path = typer.Option(Path("artifacts/quantize/report.json")),
    label_qa_report: Path = typer.Option(Path("artifacts/label_qa/report.json")),
    export_metrics: Path = typer.Option(Path("artifacts/export/metrics.json")),
    manifest: Path = typer.Option(Path("artifacts/label_qa/manifest.json")),
    out: Path = typer.Option(Path("artifacts/promote")),
) -> None:
    """Gate the candidate and register it in the MLflow model registry."""
    from tasks.harness.stage import lineage_tags

    with stage_entry("promote", params) as ctx:
        ctx.log_params(ctx.params.promote)
        for stale in ("decision.json", "model_card.md"):
            remove(out / stale)
        tracker = ctx.tracker
        try:
            decision = run(
                ctx.params,
                inputs=Inputs(
                    evaluations,
                    onnx_path,
                    engines,
                    quantize_report,
                    label_qa_report,
                    export_metrics,
                    manifest,
                ),
                out=out,
                client=tracker.client,
                run_id=tracker.run.info.run_id,
                lineage={
                    **lineage_tags(ctx.params, params),
                    "mlflow_parent_run_id": tracker.parent_id,
                },
            )
        except MlflowException as e:
            raise ShrinkflowError(f"MLflow registry at {tracker.uri}: {e.message}") from e
        ctx.log_metrics(
            {
                "passed": decision["passed"],
                "champion": decision["champion"],
                "version": decision["version"],
                **{f"gate.{k}": g["passed"] for k, g in decision["gates"].items()},
            }
        )
        ctx.log_artifact(out / "decision.json")
        log.info(
            "%s v%s: %s (%s)",
            decision["registered_model"],
            decision["version"],
            decision["outcome"],
            decision["note"],
        )
        for r in decision["reasons"]:
            log.info("  failed %s", r)


if __name__ == "__main__":
    app()
