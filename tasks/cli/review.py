"""Human review of registered candidates (commands of the `shrinkflow` CLI):

    shrinkflow review                          # candidates and their KPIs beside the champion's
    shrinkflow review --history                # every alias move: who, what, from -> to, when
    shrinkflow promote 7 --reason "..."        # make v7 champion (the champion -> previous)
    shrinkflow promote 8 --force --reason "..."  # v8 failed its gates: only forced, with a reason
    shrinkflow reject 7 --reason "..."         # record a rejection; v7 loses `challenger`
    shrinkflow rollback --reason "..."         # `previous` becomes champion again

Decisions are model-version tags (`review`, `review_reason`, `reviewed_by`, `reviewed_at`; a
forced promotion adds `review_forced` and `review_forced_gate_reasons`) and entries of the alias
ledger (tasks/promote/ledger.py, the same compare-and-set as the promote stage). A version is
rejected once; a rejected one is not promoted.

The project is the folder of `--params`, or else the nearest folder at or above the working
directory holding `dvc.yaml` and `params.yaml`; outside a project the commands refuse. The
registry is MLFLOW_TRACKING_URI's, by default the project's `mlflow.db`; a SQLite store that does
not exist is an error (the commands never create an empty one). The model name comes from
params.yaml (`project.registered_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from tasks.harness.errors import ShrinkflowError
from tasks.harness.stage import fail, setup_logging

log = logging.getLogger(__name__)
KPI_COLUMNS = ("map50", "map50_95", "latency_ms_p50", "size_mb")
PARAMS_HELP = "the project's params.yaml (default: found at or above the working directory)"


def project_params(params: Path | None, cwd: Path | None = None) -> Path:
    """`params` when given, else the params.yaml of the nearest folder at or above `cwd` that
    holds both dvc.yaml and params.yaml. Raises ShrinkflowError outside a project."""
    if params is not None:
        if not params.is_file():
            raise ShrinkflowError(f"{params}: file not found")
        return params
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder / "params.yaml"
    raise ShrinkflowError(
        f"{here} is not inside a Shrinkflow project (no dvc.yaml and params.yaml here or above): "
        "run this in the project or pass --params <project>/params.yaml"
    )


def registry_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or the project's SQLite store; a SQLite file must exist already."""
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ShrinkflowError(
                f"{db}: no MLflow store (nothing was promoted in this project yet?); run "
                "`dvc repro` first or set MLFLOW_TRACKING_URI to the registry's server"
            )
    return uri


def _ledger(params: Path | None):
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from tasks.harness.config import load_params
    from tasks.harness.tracking import check_reachable
    from tasks.promote.ledger import AliasLedger

    params = project_params(params)
    cfg = load_params(params)
    uri = registry_uri(params.parent)
    try:
        check_reachable(uri)
    except ConnectionError as e:
        raise ShrinkflowError(str(e)) from e
    client = MlflowClient(uri)
    return AliasLedger(
        client, cfg.project.registered_model, lock_timeout_s=cfg.promote.lock_timeout_s
    )


def _version(ledger, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return ledger.client.get_model_version(ledger.name, version)
    except MlflowException as e:
        raise ShrinkflowError(f"{ledger.name}: no version {version} ({e.message})") from e


def _record(ledger, version: str, verdict: str, reason: str, **extra: str) -> None:
    from tasks.promote.ledger import actor, now_iso

    who = actor()
    tags = {
        "review": verdict,
        "review_reason": reason,
        "reviewed_by": f"{who['user']}@{who['host']}",
        "reviewed_at": now_iso(),
        **extra,
    }
    for k, v in tags.items():
        ledger.client.set_model_version_tag(ledger.name, version, k, v)


def _guard(fn):
    """Map expected failures to `error: ...` on stderr and their exit status."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from mlflow.exceptions import MlflowException

        from tasks.harness.tracking import tracking_uri

        setup_logging()
        try:
            return fn(*args, **kwargs)
        except ShrinkflowError as e:
            fail(e)
        except MlflowException as e:
            fail(ShrinkflowError(f"MLflow registry at {tracking_uri()}: {e.message}"))

    return wrapper


@_guard
def review(
    params: Path | None = typer.Option(None, help=PARAMS_HELP),
    limit: int = typer.Option(20, min=1, help="newest versions shown"),
    history: bool = typer.Option(False, "--history", help="list every alias move instead"),
) -> None:
    """List candidates with their KPIs beside the champion's (or the alias history)."""
    from rich.console import Console
    from rich.table import Table

    ledger = _ledger(params)
    console = Console()
    if history:
        table = Table(title=f"{ledger.name}: alias moves")
        for col in ("#", "when", "who", "action", "moves", "reason", "state"):
            table.add_column(col)
        for t in ledger.history():
            moves = ", ".join(
                f"{m['alias']}: {m['from'] or '-'} -> {m['to'] or '-'}" for m in t["moves"]
            )
            who = f"{t['user']}@{t['host']} pid {t['pid']}"
            table.add_row(
                str(t["seq"]),
                t["at"] or "",
                who,
                t["action"] or "",
                moves,
                t["reason"] or "",
                t["state"] or "",
            )
        console.print(table)
        return
    snap = ledger.snapshot()
    versions = ledger.client.search_model_versions(
        f"name = '{ledger.name}'", max_results=limit, order_by=["version_number DESC"]
    )
    champ = (
        ledger.client.get_model_version(ledger.name, snap.champion).tags if snap.champion else {}
    )
    table = Table(
        title=f"{ledger.name}: champion {('v' + snap.champion) if snap.champion else 'none'}"
    )
    for col in ("version", "aliases", "gate", "review", *KPI_COLUMNS, "failed gates"):
        table.add_column(col)
    by_version = {}
    for alias, v in snap.aliases.items():
        by_version.setdefault(v, []).append(alias)
    for mv in versions:
        t = mv.tags
        cells = []
        for k in KPI_COLUMNS:
            if k not in t:
                cells.append("")
                continue
            text = f"{float(t[k]):.4g}"
            if k in champ and str(mv.version) != snap.champion:
                text += f" ({float(t[k]) - float(champ[k]):+.3g})"
            cells.append(text)
        table.add_row(
            f"v{mv.version}",
            ", ".join(sorted(by_version.get(str(mv.version), []))),
            t.get("gate", ""),
            t.get("review", ""),
            *cells,
            "" if t.get("gate") == "passed" else t.get("gate_reasons", ""),
        )
    console.print(table)
    console.print("KPIs in brackets: difference to the champion.")


@_guard
def promote(
    version: str = typer.Argument(..., help="model version to make champion"),
    reason: str | None = typer.Option(
        None, help="why (recorded; required with --force; default 'approved by reviewer')"
    ),
    force: bool = typer.Option(
        False, "--force", help="promote a version whose gates failed (needs --reason)"
    ),
    params: Path | None = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Make VERSION the champion (the current champion becomes `previous`). A version whose
    gates did not pass needs --force and a --reason, both recorded."""
    ledger = _ledger(params)
    mv = _version(ledger, version)
    if mv.tags.get("review") == "rejected":
        raise ShrinkflowError(
            f"v{version} was rejected ({mv.tags.get('review_reason')}); promote another version"
        )
    gate = mv.tags.get("gate", "unknown")
    failed = mv.tags.get("gate_reasons", "no gate verdict recorded")
    extra = {}
    if gate != "passed":
        if not force or not (reason or "").strip():
            raise ShrinkflowError(
                f"v{version} did not pass its gates ({gate}: {failed}); promote it only with "
                '--force --reason "<why>" (both are recorded)'
            )
        log.warning(
            "v%s did not pass its gates (%s); forced by the reviewer: %s", version, failed, reason
        )
        extra = {"review_forced": "true", "review_forced_gate_reasons": failed[:5000]}
    reason = reason or "approved by reviewer"
    snap = ledger.snapshot()
    if snap.champion == version:
        raise ShrinkflowError(f"v{version} is already the champion")
    changes = {"champion": version}
    if snap.champion:
        changes["previous"] = snap.champion
    ledger.move(
        changes,
        action="human-promote-forced" if extra else "human-promote",
        version=version,
        reason=f"{reason} (forced past failed gates: {failed})" if extra else reason,
        expect_champion=snap.champion,
    )
    _record(ledger, version, "approved", reason, **extra)
    log.info(
        "%s: champion %s -> v%s",
        ledger.name,
        f"v{snap.champion}" if snap.champion else "none",
        version,
    )


@_guard
def reject(
    version: str = typer.Argument(..., help="model version to reject"),
    reason: str = typer.Option(..., help="why (recorded; required)"),
    params: Path | None = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Record a rejection of VERSION; it loses the `challenger` alias."""
    ledger = _ledger(params)
    tags = _version(ledger, version).tags
    if tags.get("review") == "rejected":
        raise ShrinkflowError(
            f"v{version} was rejected already ({tags.get('review_reason')}, by "
            f"{tags.get('reviewed_by')} at {tags.get('reviewed_at')})"
        )
    snap = ledger.snapshot()
    if snap.champion == version:
        raise ShrinkflowError(f"v{version} is the champion: run `shrinkflow rollback` first")
    _record(ledger, version, "rejected", reason)
    if snap.aliases.get("challenger") == version:
        ledger.move(
            lambda s: {"challenger": None} if s.aliases.get("challenger") == version else {},
            action="reject",
            version=version,
            reason=reason,
        )
    log.info("%s: v%s rejected (%s)", ledger.name, version, reason)


@_guard
def rollback(
    reason: str = typer.Option("rollback", help="why (recorded)"),
    params: Path | None = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Make `previous` the champion again; `previous` moves one step further back in history."""
    ledger = _ledger(params)
    snap = ledger.snapshot()
    back = snap.aliases.get("previous")
    if not back:
        raise ShrinkflowError(f"{ledger.name}: no `previous` version to roll back to")
    bad = snap.champion
    older = ledger.champion_before(back)
    changes = {"champion": back, "previous": older if older != bad else None}
    ledger.move(changes, action="rollback", version=back, reason=reason, expect_champion=bad)
    if bad:
        _record(ledger, bad, "rolled-back", reason)
    log.info("%s: champion v%s -> v%s (rollback)", ledger.name, bad, back)


def register(app: typer.Typer) -> None:
    """Add the review commands to the `shrinkflow` CLI."""
    app.command("review")(review)
    app.command("promote")(promote)
    app.command("reject")(reject)
    app.command("rollback")(rollback)
