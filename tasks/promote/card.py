"""The model card of a candidate (Markdown): data version, lineage, KPI table beside the FP32
baseline and the champion, gate verdicts, and the params that made it.

Two words never share a name here: the *numeric format* of the deployed graph (`int8`, `fp32`:
the `numeric_format` tag, read from the ONNX) and the *precision* KPI (a detection-quality
figure, the `precision` tag)."""

from __future__ import annotations

import yaml

from tasks.promote.gates import Verdict

KPI_ROWS = (
    "map50",
    "map50_95",
    "precision",
    "recall",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_ips",
    "size_mb",
    "params",
    "macs",
)


KPI_LABELS = {"precision": "precision (KPI)"}


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def render(
    *,
    name: str,
    metrics: dict,
    verdicts: list[Verdict],
    tags: dict[str, str],
    champion: tuple[str, dict] | None,
    params: dict,
) -> str:
    """The card. `champion` is (version, its model-version tags) or None; `params` the resolved
    params.yaml sections that shaped the candidate."""
    passed = all(v.passed for v in verdicts)
    base = metrics["baseline"]
    head = ["KPI", f"candidate ({metrics['target']})", f"FP32 ({base['name']})"]
    if champion:
        head.append(f"champion v{champion[0]}")
    rows = []
    for k in KPI_ROWS:
        cells = [KPI_LABELS.get(k, k), _fmt(metrics.get(k)), _fmt(base.get(k))]
        if champion:
            cells.append(_fmt(champion[1].get(k)))
        rows.append("| " + " | ".join(cells) + " |")
    cells = ["numeric format (graph)", tags.get("numeric_format", ""), "fp32"]
    if champion:
        cells.append(champion[1].get("numeric_format", ""))
    rows.append("| " + " | ".join(cells) + " |")
    gates = [
        f"| {v.name} | {v.kind} | {'passed' if v.passed else '**failed**'} | {v.reason} |"
        for v in verdicts
    ]
    lineage = [
        f"| {k} | `{tags.get(k, '')}` |"
        for k in (
            "git_commit",
            "dvc_lock_md5",
            "data_md5",
            "params_md5",
            "calibration_md5",
            "label_qa_report_md5",
            "onnx_md5",
            "mlflow_parent_run_id",
        )
    ]
    return "\n".join(
        [
            f"# Model card: {name}",
            "",
            f"Gate: **{'passed' if passed else 'failed'}** "
            f"({sum(v.passed for v in verdicts)}/{len(verdicts)} gates). Engine served: "
            f"`{metrics['target']}`, numeric format `{tags.get('numeric_format', '?')}` "
            f"({tags.get('quantize_linear_nodes', '?')} QuantizeLinear nodes in the graph). "
            f"Test split: {metrics['test_images']} images; KPIs from "
            f"`evaluate@{metrics['target']}`.",
            "",
            "## KPIs",
            "",
            "| " + " | ".join(head) + " |",
            "|" + " --- |" * len(head),
            *rows,
            "",
            "## Gates",
            "",
            "| gate | kind | verdict | figures |",
            "| --- | --- | --- | --- |",
            *(gates or ["| (none: promote.allow_no_gates is true) | | passed | |"]),
            "",
            "## Data and lineage",
            "",
            "| what | value |",
            "| --- | --- |",
            *lineage,
            "",
            "## Params",
            "",
            "```yaml",
            yaml.safe_dump(params, sort_keys=False).rstrip(),
            "```",
            "",
            "## Use",
            "",
            f"`mlflow.pyfunc.load_model('models:/{name}@champion').predict(df)` with a column "
            "`image` of PNG/JPEG bytes returns one row per detection (image, category_id, "
            "category, score, x, y, width, height in the image's pixels); "
            f"`mlflow models serve -m models:/{name}@champion --env-manager local` serves it.",
            "",
        ]
    )
