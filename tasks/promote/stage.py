"""Stage `promote`: judge the candidate with the gates of `params.yaml`, register it as a version
of the MLflow registered model, and move the aliases.

The stage refuses to run without its own `promote` section in params.yaml, and with no gates
unless `promote.allow_no_gates: true` says so. Every candidate becomes a version with alias
`challenger`, once: a candidate whose ONNX and serving spec (target, engine settings; tag
`candidate_md5`) are registered already is judged again as that version. `champion` moves to it
only when every gate passes, by a compare-and-set on the champion read at the start
(tasks/promote/ledger.py), and the champion it replaces becomes `previous`. The version carries
the pyfunc model (ONNX + the built engines, as models-from-code), the model card as its
description, lineage tags, one tag per KPI, `numeric_format` (read from the graph), `gate` and
`gate_reasons`. The champion is compared from its engine files, never by loading its code or a
pickle. Everything is prepared locally first; a failure after the version was created deletes it
again. `artifacts/promote/decision.json` (a DVC metrics file) holds the verdicts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import typer
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.harness.config import Params
from tasks.harness.errors import ConfigError, ShrinkflowError
from tasks.harness.io import md5_file, remove, write_json, write_text
from tasks.harness.stage import stage_entry
from tasks.promote import card, pyfunc
from tasks.promote.candidate import (
    DELTAS,
    KPIS,
    Inputs,
    champion_evidence,
    example_image,
    graph_format,
    package,
    version_tags,
)
from tasks.promote.gates import Evidence, evaluate_gates
from tasks.promote.ledger import AliasLedger, ChampionMoved
from tasks.promote.registry import (
    candidate_md5,
    find_candidate,
    register_version,
    unregister,
    update_version,
)

log = logging.getLogger(__name__)


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
        try:  # a failed alias transaction restores the aliases it moved (ledger.py)
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
        "kpis": {k: metrics[k] for k in (*KPIS, *DELTAS) if k in metrics},
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
