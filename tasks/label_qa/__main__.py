"""`python -m tasks.label_qa`: the DVC entry point (reports, cleaned manifest, metrics, gate)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import typer

from tasks.harness.errors import DataQualityError, ShrinkflowError
from tasks.harness.io import meta, remove, write_json
from tasks.harness.stage import stage_entry
from tasks.label_qa import review
from tasks.label_qa.core import run
from tasks.label_qa.report import write_reports
from tasks.metrics.detection import Runner

log = logging.getLogger("tasks.label_qa")
OUTPUTS = (
    "manifest.json",
    "metrics.json",
    "report.json",
    "report.md",
    "meta.json",
    "images",
    "review",
)


def champion_runner(model_name: str, work: Path) -> tuple[Runner, int, str] | None:
    """The ONNX model of `models:/<model_name>@champion` at the tracking URI, run with ONNX
    Runtime: (runner, input size, model version), or None when no champion is registered."""
    import mlflow
    import onnxruntime as ort
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.harness.tracking import tracking_uri

    uri = tracking_uri()
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException as e:
        if _no_champion(e):
            return None
        raise ShrinkflowError(
            f"MLflow registry at {uri}: cannot read {model_name}@champion: {e.message}"
        ) from e
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}@champion", dst_path=str(work), tracking_uri=uri
        )
    )
    # the deployable graph (4-output signature); prefer `model.onnx` nearest the top
    found = sorted(local.rglob("*.onnx"), key=lambda p: (p.name != "model.onnx", len(p.parts)))
    session = None
    if found:
        session = ort.InferenceSession(str(found[0]), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0] if session else None
    if inp is None or len(session.get_outputs()) != 4 or not isinstance(inp.shape[-1], int):
        log.warning(
            "champion %s v%s holds no fixed-size 4-output ONNX model: val/test use the "
            "cross-fit instead",
            model_name,
            version.version,
        )
        return None
    size = int(inp.shape[-1])

    def runner(x: np.ndarray):
        return session.run(None, {inp.name: x.astype(np.float32)})

    return runner, size, str(version.version)


def _no_champion(e: Exception) -> bool:
    """Whether an MLflow error says there is no such registered model or no `champion` alias
    (and not, say, that the server or its store failed)."""
    code = getattr(e, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in str(e) and "not found" in str(e)
    )


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    dataset: Path = typer.Option(
        ..., help="ingest's manifest.json, or a folder with {train,val,test}.json"
    ),
    out: Path = typer.Option(Path("artifacts/label_qa"), help="folder for reports and manifest"),
) -> None:
    """Check the dataset, write the reports and the cleaned manifest; gate on the error rate."""
    with stage_entry("label_qa", params) as ctx, tempfile.TemporaryDirectory() as work:
        cfg = ctx.params.label_qa
        ctx.log_params(cfg)
        for stale in (*OUTPUTS, "plots/findings.csv"):
            remove(out / stale)
        champion = None
        if cfg.model.enabled and cfg.model.champion:
            champion = champion_runner(ctx.params.project.registered_model, Path(work))
        if champion is not None:
            log.info("label_qa: val/test scored by champion version %s", champion[2])
        result = run(
            cfg,
            dataset=dataset,
            train_cfg=ctx.params.train,
            model_cfg=ctx.params.model,
            champion=champion[:2] if champion else None,
            decisions=Path(cfg.decisions),
        )
        findings, manifest, metrics = result
        sources = result.ctx.prediction_source
        review.export(findings, result.ctx, out / "review")
        write_reports(
            findings,
            metrics,
            paths=result.image_paths(),
            boxes=result.boxes(),
            sources=sources,
            out_dir=out,
            cfg=cfg,
        )
        ctx.log_metrics(metrics)
        for name in ("report.json", "report.md", "images", "review"):
            ctx.log_artifact(out / name, None if name not in ("images", "review") else name)
        if metrics["error_rate"] > cfg.max_error_rate:
            errors = metrics["errors_per_rule"]
            tripped = ", ".join(f"{k}={v}" for k, v in errors.items() if v)
            raise DataQualityError(
                f"label QA gate: error rate {metrics['error_rate']:.2%} exceeds "
                f"label_qa.max_error_rate={cfg.max_error_rate:.2%}; rules that tripped: "
                f"{tripped}; see {out / 'report.md'} and {out / 'report.json'}"
            )
        write_json(out / "manifest.json", manifest)
        inputs = {"dataset": dataset}
        if Path(cfg.decisions).exists():
            inputs["decisions"] = Path(cfg.decisions)
        info = meta(cfg, inputs, ("pycocotools", "cleanlab", "scikit-learn"))
        info["prediction_source"] = sources
        if champion is not None:
            info["champion_version"] = champion[2]
        write_json(out / "meta.json", info)
        write_json(out / "metrics.json", metrics)
        log.info(
            "label QA: %d findings, error rate %.2f%%", len(findings), 100 * metrics["error_rate"]
        )


if __name__ == "__main__":
    app()
