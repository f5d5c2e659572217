"""The quantize stage's report: report.md and the flat metrics (per target too)."""

from __future__ import annotations

from tasks.quantization.qdq import CALIBRATORS


def render(report: dict) -> str:
    """The quantize stage's report.md from its report dict."""
    lines = [
        "# Quantization report",
        "",
        f"Deployed precision: **{report['precision']}** ({report['precision_reason']}). "
        f"Calibrator: {report['calibrator']}, {report['calibration']['count']} train images "
        f"(ids md5 {report['calibration']['md5']}).",
        "",
        *(
            [
                f"Quantization-aware fine-tune: {report['qat']['epochs']} epochs (lr "
                f"{report['qat']['lr']}) before calibration; `int8_without_qat` is the same "
                "calibrator on the model before it.",
                "",
            ]
            if "qat" in report
            else []
        ),
        "| model | val mAP@0.5 | batch-1 latency (ms, ONNX Runtime) |",
        "| --- | --- | --- |",
    ]
    lat = report["latency_ms_p50_batch1"]
    for k, v in report["val_map50"].items():
        lines.append(f"| {k} | {v:.4f} | {lat[k]:.3f} |" if k in lat else f"| {k} | {v:.4f} | |")
    if "sensitivity" in report:
        lines += [
            "",
            "| layer | mAP@0.5 drop with only this layer INT8 | precision |",
            "| --- | --- | --- |",
        ]
        for k, v in report["sensitivity"].items():
            lines.append(f"| {k} | {v:+.4f} | {report['layer_precision'][k]} |")
    if "layer_types" in report:
        lines += [
            "",
            "Per layer type, batch-1 latency with that type in INT8 and in float (the rest as "
            "chosen above, medians over rounds); a type stays float only when float is faster "
            "by the `keep_faster_margin` in the median and in every round.",
            "",
            "| layer type | layers | INT8 (ms) | float (ms) | kept |",
            "| --- | --- | --- | --- | --- |",
        ]
        for kind, t in report["layer_types"].items():
            timed = f"{t['int8_ms']:.3f} | {t['float_ms']:.3f}" if "int8_ms" in t else "recorded | "
            lines.append(f"| {kind} | {len(t['layers'])} | {timed} | {t['precision']} |")
    if "targets" in report:
        lines += render_targets(report["targets"])
    return "\n".join(lines) + "\n"


def stage_metrics(report: dict) -> dict:
    """The quantize stage's flat metrics.json from its report dict (the targets' included)."""
    metrics = {
        "precision": report["precision"],
        "calibration_md5": report["calibration"]["md5"],
        "val_map50_fp32": report["val_map50"]["fp32"],
        "val_map50_int8": report["val_map50"]["int8"],
        "val_map50_fp16": report["val_map50"]["fp16"],
        **{
            k.replace("int8_", "val_map50_int8_"): v
            for k, v in report["val_map50"].items()
            if k == "int8_without_qat"
        },
        "int8_map_drop": report["int8_map_drop"],
        "layers_kept_float": sum(v == "fp32" for v in report["layer_precision"].values()),
        **{f"latency_ms_p50_{k}": v for k, v in report["latency_ms_p50_batch1"].items()},
        **{
            f"val_map50_int8_{k}": report["val_map50"][f"int8_{k}"]
            for k in CALIBRATORS
            if f"int8_{k}" in report["val_map50"]
        },
    }
    return metrics | target_metrics(report["targets"])


def target_metrics(targets: dict[str, dict]) -> dict:
    """Flat metrics of the per-target models: `<model>.val_map50_int8`, `<target>.precision`."""
    metrics = {}
    for name, facts in targets.items():
        for key in ("precision", "val_map50_int8", "int8_map_drop", "status", "method"):
            if key in facts:
                metrics[f"{name}.{key}"] = facts[key]
        for cand, figures in facts.get("best", {}).get("candidates", {}).items():
            for key, value in figures.items():
                metrics[f"{name}.best.{cand}.{key}"] = value
    return metrics


def render_targets(targets: dict[str, dict]) -> list[str]:
    """Markdown lines: the model each target is built from (and, for `method: best`, both
    candidates as measured on the target's engine)."""
    lines = ["", "| target / model | made as | precision | val mAP@0.5 INT8 | note |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for name, f in targets.items():
        int8 = f"{f['val_map50_int8']:.4f}" if "val_map50_int8" in f else ""
        made = f.get("model", "full-integer .tflite" if name == "litert" else "")
        if name == "nncf":
            made = f["made_by"]
        note = f.get("reason", f.get("status", ""))
        lines.append(f"| {name} | {made} | {f.get('precision', '')} | {int8} | {note} |")
    best = {t: f["best"] for t, f in targets.items() if "candidates" in f.get("best", {})}
    if best:
        lines += [
            "",
            "`quantize.method: best`: each candidate built on the target's engine, val mAP@0.5 "
            "and batch-1 latency (median over alternating blocks) measured there.",
            "",
            "| target | candidate | val mAP@0.5 | batch-1 ms | kept |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t, b in best.items():
            for cand, fig in b["candidates"].items():
                kept = "yes" if cand == b["chosen"] else ""
                lines.append(
                    f"| {t} | {cand} | {fig['val_map50']:.4f} | {fig['latency_ms_p50']:.3f} "
                    f"| {kept} |"
                )
            for cand, why in b.get("refused", {}).items():
                lines.append(f"| {t} | {cand} | refused by the engine: {why} | | |")
    return lines
