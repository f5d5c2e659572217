"""The recipe sweep: a grid of compression recipes, their KPIs, and their Pareto front.

Two ways to run the recipes:

- **Fanned out** (`recipe_deployment` names a deployment of `flows/recipe.py:recipe`): each recipe
  is submitted as its own flow run of that deployment (`run_deployment(..., timeout=0)`), so the
  workers of its work pool run as many recipes at once as the pool allows (its concurrency limit,
  one run per worker with `prefect worker start --limit 1`). Each worker clones the project at the
  baseline commit, pulls the baseline's outputs from the shared DVC remote, runs its recipe as a
  DVC experiment, pushes it back (`dvc exp push`) and logs the KPIs to the shared MLflow server,
  where the sweep collects them.
- **Here, in sequence** (no `recipe_deployment`): every recipe is queued with
  `dvc exp run --queue -S key=value ...` and the queue is run in this workspace; the KPIs come
  from `dvc exp show --json`.

Either way each experiment re-runs only the stages its params touch (the rest come from the
committed baseline's cache), and the Pareto front of latency vs mAP@0.5 (tasks/metrics/pareto.py) is
written as a table and a plot, logged to MLflow (a `sweep` run) and published as a Prefect
artifact. The best recipe under the gate (fastest with mAP@0.5 within `max_map50_drop` of the FP32
baseline) is named.

    python -m flows.sweep -g quantize.calibrator=minmax,percentile -g prune.macs_reduction=0.3,0.5
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.fanout import collect_fanned, share_baseline, submit, wait_all
from flows.project import run_dvc
from flows.recipe import KPIS, overrides
from tasks.harness.config import Params, _format, load_params
from tasks.harness.errors import ConfigError, StageFailed
from tasks.harness.project import dvc
from tasks.metrics import pareto

DEFAULT_GRID: dict[str, list[Any]] = {
    "prune.macs_reduction": [0.3, 0.5, 0.7],
    "quantize.calibrator": ["minmax", "percentile"],
    "quantize.precision": ["int8", "fp16"],
}


def recipes(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in grid order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def check_recipes(root: Path, grid_recipes: list[dict[str, Any]]) -> None:
    """Validate params.yaml under every recipe before anything is queued.

    Raises:
        ConfigError: a recipe makes params.yaml invalid (the message names the recipe).
    """
    from pydantic import ValidationError

    base = yaml.safe_load((root / "params.yaml").read_text())
    problems = []
    for recipe in grid_recipes:
        params = json.loads(json.dumps(base))
        for key, value in recipe.items():
            *path, leaf = key.split(".")
            node = params
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        try:
            Params.model_validate(params)
        except ValidationError as e:
            problems.append(f"recipe {recipe}:\n{_format('params.yaml', e)}")
    if problems:
        raise ConfigError("\n".join(problems))


@task(name="queue-experiments", cache_policy=NO_CACHE)
def queue(root: Path, named: dict[str, dict[str, Any]]) -> None:
    """`dvc exp run --queue -n <name> -S key=value ...` for each recipe."""
    logger = get_run_logger()
    for name, recipe in named.items():
        result = run_dvc(
            root, "exp", "run", "--queue", "-n", name, *overrides(recipe), timeout_s=300
        )
        if result.returncode != 0:
            raise StageFailed(f"could not queue {name} {recipe}:\n{result.tail()}")
        logger.info("queued %s: %s", name, recipe)


@task(name="run-experiments", cache_policy=NO_CACHE)
def run_queue(root: Path, jobs: int, env: dict[str, str], timeout_s: float) -> None:
    """Run the queued experiments (`dvc exp run --run-all`); their output goes to the log."""
    logger = get_run_logger()
    result = run_dvc(
        root, "exp", "run", "--run-all", "-j", str(jobs), env=env, timeout_s=timeout_s,
        on_line=logger.info,
    )  # fmt: skip
    if result.returncode != 0 or result.timed_out:
        # failed experiments are reported per recipe below; DVC's summary is kept in the log
        logger.warning("dvc exp run --run-all exited %s:\n%s", result.returncode, result.tail())


@task(name="collect-kpis", cache_policy=NO_CACHE)
def collect(root: Path, named: dict[str, dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """One row per experiment: its recipe and the target's KPIs (`dvc exp show --json`)."""
    shown = dvc(root, "exp", "show", "--json")
    if shown.returncode != 0:
        raise StageFailed(f"dvc exp show failed:\n{shown.stderr[-3000:]}")
    found: dict[str, dict] = {}
    for baseline in json.loads(shown.stdout):
        for exp in baseline.get("experiments") or []:
            rev = exp["revs"][0]
            if exp.get("name") in named or rev.get("name") in named:
                found[exp.get("name") or rev["name"]] = rev
    metrics_file = f"artifacts/evaluate/{target}/metrics.json"
    rows = []
    for name, recipe in named.items():
        row: dict[str, Any] = {"experiment": name, **recipe}
        rev = found.get(name)
        data = ((rev or {}).get("data") or {}).get("metrics", {}).get(metrics_file, {})
        m = data.get("data") or {}
        if rev is None or rev.get("error") or not m:
            row["status"] = "failed: no KPIs (see the run-experiments log)"
        else:
            row["status"] = m.get("status", "ok")
            row |= {k: m.get(k) for k in KPIS}
        rows.append(row)
    return rows


def best_recipe(rows: list[dict[str, Any]], max_map50_drop: float) -> dict[str, Any] | None:
    """The fastest recipe whose mAP@0.5 is within `max_map50_drop` of the FP32 baseline."""
    passing = [
        r for r in rows if r["status"] == "ok" and r["delta_map50"] >= -max_map50_drop - 1e-12
    ]
    return min(passing, key=lambda r: r["latency_ms_p50"], default=None)


def _log_to_mlflow(
    uri: str, params: Params, run_name: str, grid: dict, files: list[Path], best: dict | None
) -> str:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from tasks.harness.tracking import ensure_experiment

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, params.project.mlflow_experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={"shrinkflow.role": "sweep"})
    rid = run.info.run_id
    client.log_param(rid, "grid", json.dumps(grid))
    client.set_tag(rid, "best_recipe", best["experiment"] if best else "none")
    if best:
        for k in ("latency_ms_p50", "map50", "delta_map50"):
            client.log_metric(rid, f"best.{k}", float(best[k]))
    for f in files:
        client.log_artifact(rid, str(f), artifact_path="sweep")
    client.set_terminated(rid)
    return rid


@flow(name="sweep")
def sweep(
    project: str = ".",
    grid: dict[str, list[Any]] | None = None,
    target: str = "onnxruntime",
    max_map50_drop: float = 0.01,
    jobs: int = 1,
    mlflow_tracking_uri: str | None = None,
    recipe_deployment: str | None = None,
    git_url: str | None = None,
) -> dict[str, Any]:
    """Run a grid of recipes as DVC experiments (here or fanned out over a work pool); publish
    the Pareto front of latency vs mAP@0.5.

    Args:
        project: the DVC project; its baseline (dvc.lock) should be committed, so experiments
            re-run only what their params touch.
        grid: params key -> values (default: prune ratio x calibrator x precision).
        target: the engine whose KPIs are compared.
        max_map50_drop: the gate of the best recipe: mAP@0.5 at most this below FP32 (0.01 = 1
            point).
        jobs: experiments run at once here (`dvc exp run --run-all -j`); unused when fanned out.
        mlflow_tracking_uri: where stages and the sweep log (else MLFLOW_TRACKING_URI, else the
            project's `mlflow.db`, made absolute: experiments run in temp copies). Fanned out,
            it must be a server every worker reaches.
        recipe_deployment: `sweep-recipe/<deployment>` to fan the recipes out to (one flow run
            each, on that deployment's work pool); None runs them here, in sequence.
        git_url: the repository workers clone and push experiments to (default: the project's
            directory, for workers on this machine).

    Returns:
        `experiments` (rows), `front` (experiment names on the Pareto front), `best` (or None).
    """
    logger = get_run_logger()
    root = Path(project).resolve()
    params = load_params(root / "params.yaml")
    grid = grid or DEFAULT_GRID
    grid_recipes = recipes(grid)
    check_recipes(root, grid_recipes)
    prefix = f"sweep-{str(flow_run.id)[:8]}"
    named = {f"{prefix}-{i}": r for i, r in enumerate(grid_recipes)}
    uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or f"sqlite:///{root / 'mlflow.db'}"
    if recipe_deployment and not uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"a fanned-out sweep needs an MLflow server every worker reaches, not {uri} "
            "(mlflow_tracking_uri / MLFLOW_TRACKING_URI)"
        )
    if recipe_deployment:
        commit = share_baseline(root, params.flow.timeout_s)
        common = {
            "commit": commit,
            "sweep_id": prefix,
            "git_url": git_url or str(root),
            "target": target,
            "mlflow_tracking_uri": uri,
        }
        ids = submit(recipe_deployment, named, common)
        # the pool runs as many at once as it has slots; allow each recipe its full timeout
        runs = wait_all(ids, params.flow.timeout_s * len(named))
        rows = collect_fanned(uri, params.project.mlflow_experiment, prefix, named, runs)
    else:
        queue(root, named)
        run_queue(root, jobs, {"MLFLOW_TRACKING_URI": uri}, params.flow.timeout_s * len(named))
        rows = collect(root, named, target)

    ok = [r for r in rows if r["status"] == "ok"]
    front = pareto.pareto_front(ok)
    on_front = {r["experiment"] for r in front}
    best = best_recipe(rows, max_map50_drop)
    for r in rows:
        r["pareto"] = r["experiment"] in on_front
    columns = {"experiment": "experiment", **{k: k for k in grid}, "status": "status"}
    columns |= {k: k for k in ("map50", "delta_map50", "latency_ms_p50", "size_mb")}
    columns["pareto"] = "on front"
    verdict = (
        f"**Best recipe** (fastest with mAP@0.5 within {max_map50_drop * 100:g} point(s) of "
        f"FP32, {target}): `{best['experiment']}` "
        + " ".join(f"`{k}={best[k]}`" for k in grid)
        + f" — {best['latency_ms_p50']:.4g} ms, mAP@0.5 {best['map50']:.4g}"
        if best
        else f"**No recipe passes the gate** (mAP@0.5 within {max_map50_drop * 100:g} point(s))."
    )
    table = pareto.markdown(
        sorted(rows, key=lambda r: (not r["pareto"], r.get("latency_ms_p50") or 0)),
        columns,
        f"Recipe sweep: latency vs mAP@0.5 ({target}, test split)",
    )
    report = f"{table}\n{verdict}\n"
    logger.info("%s", report)
    create_markdown_artifact(report, key="pareto-front", description="recipe sweep")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "pareto.md").write_text(report)
        (out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=2))
        files = [out / "pareto.md", out / "sweep.json"]
        if ok:
            files.append(
                pareto.plot(
                    ok, front, out / "pareto.png", "latency_ms_p50", "map50", label="experiment"
                )
            )
        run_id = _log_to_mlflow(uri, params, prefix, grid, files, best)
    logger.info("sweep logged to MLflow run %s", run_id)
    return {
        "experiments": rows,
        "front": [r["experiment"] for r in front],
        "best": best["experiment"] if best else None,
        "mlflow_run": run_id,
    }


def _parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not values:
            raise typer.BadParameter(f"{item!r}: expected key=value1,value2")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


app = typer.Typer(add_completion=False)


@app.command()
def main(
    project: Path = typer.Option(Path("."), help="the DVC project"),
    grid: list[str] = typer.Option(
        [],
        "--grid",
        "-g",
        help="key=v1,v2 (repeat per key); default: prune x calibrator x precision",
    ),
    target: str = typer.Option("onnxruntime", help="engine whose KPIs are compared"),
    max_map50_drop: float = typer.Option(0.01, help="gate: mAP@0.5 at most this below FP32"),
    jobs: int = typer.Option(1, help="experiments at once"),
    mlflow_tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI"),
    deployment: str | None = typer.Option(
        None, help="fan out: one flow run per recipe of this deployment (sweep-recipe/<name>)"
    ),
    git_url: str | None = typer.Option(None, help="fanned out: the repository workers clone"),
) -> None:
    """Run the recipe sweep (the ephemeral Prefect API unless PREFECT_API_URL is set; fanning
    out needs a server and workers)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = sweep(
        project=str(project),
        grid=_parse_grid(grid) or None,
        target=target,
        max_map50_drop=max_map50_drop,
        jobs=jobs,
        mlflow_tracking_uri=mlflow_tracking_uri,
        recipe_deployment=deployment,
        git_url=git_url,
        return_state=True,
    )
    raise typer.Exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    app()
