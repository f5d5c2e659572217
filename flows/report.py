"""What the flows publish: the KPI table of a run and links into MLflow.

Reads what the stages wrote (`artifacts/compare/engines.json`,
`artifacts/evaluate/<t>/metrics.json`, `artifacts/promote/decision.json`); computes nothing the
stages did not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

KPI_COLUMNS = {
    "map50": "mAP@0.5",
    "delta_map50": "Δ mAP@0.5 vs FP32",
    "map50_95": "mAP@0.5:0.95",
    "latency_ms_p50": "latency p50 (ms)",
    "latency_ms_p95": "latency p95 (ms)",
    "throughput_ips": "throughput (img/s)",
    "size_mb": "size (MB)",
    "speedup_vs_fp32_same_runtime": "speed-up vs FP32",
    "speedup_vs_eager": "speed-up vs eager",
}


def kpi_rows(root: Path) -> list[dict[str, Any]] | None:
    """One row per engine target from `compare` and `evaluate`'s outputs; None before they exist."""
    table = root / "artifacts" / "compare" / "engines.json"
    if not table.exists():
        return None
    rows = []
    for target, row in json.loads(table.read_text()).items():
        row = {"target": target, **row}
        metrics = root / "artifacts" / "evaluate" / target / "metrics.json"
        if row.get("status") == "ok" and metrics.exists():
            row.setdefault("delta_map50", json.loads(metrics.read_text()).get("delta_map50"))
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def kpi_markdown(rows: list[dict[str, Any]], title: str = "Shrinkflow KPIs") -> str:
    """A Markdown table: one row per engine target, skipped targets with their status."""
    head = ["target", "status", *KPI_COLUMNS.values()]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["target"], r.get("status", ""), *(_cell(r.get(k)) for k in KPI_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI address of a run, when the tracking URI is a server (not a local store)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version(root: Path) -> tuple[str, str] | None:
    """(registered model name, version) from what `promote` wrote, if it has run."""
    path = root / "artifacts" / "promote" / "decision.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    name = d.get("registered_model") or d.get("model_name") or d.get("name")
    version = d.get("version") or d.get("model_version")
    if not name or version is None:
        return None
    return str(name), str(version)


def model_version_url(tracking_uri: str, name: str, version: str) -> str | None:
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{quote(name)}/versions/{version}"
