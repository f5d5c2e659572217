"""Stage `compare`: one table across engine targets (Markdown + JSON) and a latency plot.

Reads every `artifacts/evaluate/<target>/metrics.json`; a skipped target appears with its
status. Ratios are each target's own, measured in its evaluate process against the same
references (FP32 on its runtime, FP32 PyTorch eager).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import typer

from tasks.harness.io import remove, write_json, write_text
from tasks.harness.stage import stage_entry

log = logging.getLogger(__name__)
COLUMNS = [
    "map50",
    "map50_95",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "throughput_ips",
    "size_mb",
    "speedup_vs_fp32_same_runtime",
    "speedup_vs_eager",
]


def run(targets: list[str], evaluations: Path) -> tuple[list[dict], str, str]:
    """Rows per target, the Markdown table and the latency plot CSV."""
    rows = []
    for target in targets:
        m = json.loads((evaluations / target / "metrics.json").read_text())
        row = {"target": target, "status": m["status"]}
        if m["status"] == "ok":
            row |= {k: m[k] for k in COLUMNS}
            row["parity_match_rate"] = m["parity"]["match_rate"]
        rows.append(row)
    head = ["target", "status", *COLUMNS, "parity_match_rate"]
    lines = [
        "# Engines compared (test split, batch-1 latency)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["target", "latency_ms_p50", "latency_ms_p95"])
    writer.writeheader()
    writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows if r["status"] == "ok")
    return rows, "\n".join(lines) + "\n", buf.getvalue()


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    evaluations: Path = typer.Option(Path("artifacts/evaluate")),
    out: Path = typer.Option(Path("artifacts/compare")),
) -> None:
    """Tabulate every engine target's KPIs."""
    with stage_entry("compare", params) as ctx:
        for stale in ("engines.json", "engines.md", "plots/latency.csv"):
            remove(out / stale)
        rows, table, plot = run(ctx.params.build_engine.targets, evaluations)
        write_text(out / "plots" / "latency.csv", plot)
        write_text(out / "engines.md", table)
        write_json(out / "engines.json", {r["target"]: r for r in rows})
        ctx.log_metrics(
            {f"{r['target']}.{k}": v for r in rows for k, v in r.items() if k != "target"}
        )
        ctx.log_artifact(out / "engines.md")
        ctx.log_artifact(out / "engines.json")
        ctx.log_artifact(out / "plots" / "latency.csv", "plots")
        log.info("%s", table)


if __name__ == "__main__":
    app()
