"""The label-QA reports: one JSON row per finding, a Markdown page with crops, a per-rule plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.datasets.coco import read_rgb
from tasks.harness.config import LabelQaCfg
from tasks.harness.io import atomic_dir, write_json, write_text
from tasks.label_qa.registry import RULES, Finding

LABEL_COLOUR = (230, 40, 40)  # the box as labelled
SUGGESTED_COLOUR = (40, 200, 60)  # the box the fix suggests (or the model sees)
CROP_SCALE = 3  # crops are small canvases: enlarge them so the boxes are visible


def finding_row(f: Finding, file_name: str | None = None) -> dict:
    """One finding as a JSON row (report.json, and the `qa_findings` of review/)."""
    return {
        "id": f.key,
        "split": f.split,
        "image_id": f.image_id,
        "file_name": file_name,
        "annotation_id": f.annotation_id,
        "rule": f.rule,
        "severity": f.severity,
        "score": f.score,
        "message": f.message,
        "suggested_fix": f.fix,
        "action": f.action,
        "note": f.note,
    }


def rows(findings: list[Finding], file_names: dict[tuple[str, int], str]) -> list[dict]:
    """The JSON report: one row per finding, worst (lowest score) first within a rule order."""
    order = sorted(findings, key=lambda f: (f.severity != "error", f.score))
    return [finding_row(f, file_names.get((f.split, f.image_id))) for f in order]


def _suggested_box(fix: dict | None) -> list[float] | None:
    if not fix:
        return None
    return fix.get("bbox") or fix.get("model_box") or (fix.get("add") or {}).get("bbox")


def render_crop(image: np.ndarray, labelled: list[float] | None, suggested: list[float] | None):
    """A crop around both boxes (xywh, original pixels), enlarged, with the labelled box in red
    and the suggested one in green."""
    # a negative width or height (a box_empty finding) is drawn as the box it spans
    labelled, suggested = (
        [min(b[0], b[0] + b[2]), min(b[1], b[1] + b[3]), abs(b[2]), abs(b[3])] if b else b
        for b in (labelled, suggested)
    )
    boxes = [b for b in (labelled, suggested) if b]
    h, w = image.shape[:2]
    if boxes:
        x0 = min(b[0] for b in boxes)
        y0 = min(b[1] for b in boxes)
        x1 = max(b[0] + b[2] for b in boxes)
        y1 = max(b[1] + b[3] for b in boxes)
        pad = max(8.0, 0.5 * max(x1 - x0, y1 - y0))
        left, top = int(max(0, x0 - pad)), int(max(0, y0 - pad))
        right, bottom = int(min(w, x1 + pad)), int(min(h, y1 + pad))
    else:
        left, top, right, bottom = 0, 0, w, h
    if right <= left or bottom <= top:
        left, top, right, bottom = 0, 0, w, h
    crop = Image.fromarray(image[top:bottom, left:right]).resize(
        ((right - left) * CROP_SCALE, (bottom - top) * CROP_SCALE), Image.NEAREST
    )
    draw = ImageDraw.Draw(crop)
    for box, colour in ((labelled, LABEL_COLOUR), (suggested, SUGGESTED_COLOUR)):
        if box:
            x, y, bw, bh = box
            s = CROP_SCALE
            draw.rectangle(
                [(x - left) * s, (y - top) * s, (x - left + bw) * s, (y - top + bh) * s],
                outline=colour,
                width=2,
            )
    return crop


def _round_robin(findings: list[Finding]) -> list[Finding]:
    """Errors before warnings; within each, the worst of every rule in turn, so that one busy
    rule does not fill the page."""
    out = []
    for severity in ("error", "warning"):
        per_rule: dict[str, list[Finding]] = {}
        for f in sorted(findings, key=lambda f: f.score):
            if f.severity == severity and f.image_id is not None:
                per_rule.setdefault(f.rule, []).append(f)
        queues = list(per_rule.values())
        while queues:
            out += [q.pop(0) for q in queues]
            queues = [q for q in queues if q]
    return out


def _entry(n: int, f: Finding, names: dict, image: str) -> list[str]:
    return [
        f"### {n + 1}. {f.rule} ({f.severity}, score {f.score:.3f}, {f.action})",
        "",
        f"{f.split} image {f.image_id} (`{names.get((f.split, f.image_id))}`), "
        f"annotation {f.annotation_id}: {f.message}" + (f" — {f.note}" if f.note else ""),
        "",
        f"![{f.rule}](images/{image})",
        "",
    ]


def _evidence(metrics: dict, cfg: LabelQaCfg) -> list[str]:
    """The section on the model-based rules' measured precision / recall and their verdicts."""
    evidence = metrics.get("fix_evidence") or {}
    if not evidence:
        return []
    lines = [
        "",
        "## Model-based rules: measured on errors injected into a copy of train",
        "",
        "Each run applies a rule's own changes (base: its run on train as given) to a copy of "
        f"train, injects {cfg.probe_rate:.0%} of the boxes it left alone as known errors and "
        "scores them with the same out-of-sample predictions. A rule changes labels only when "
        f"its precision is at least label_qa.min_fix_precision ({cfg.min_fix_precision}). "
        "A base change is the data's own error or a false alarm: it is credited as right only "
        "up to the "
        f"rule's recall x label_qa.max_own_error_rate ({cfg.max_own_error_rate:.0%} per kind) "
        "of the boxes, and only as far as its scores look like the injected errors' "
        "(`tasks/label_qa/probe.py`); any other change on the copy (collateral) is wrong. "
        "Precision is that of the base changes, the ones a fix applies (the injected errors' "
        "figure when there are none). "
        f"Decisions in `{cfg.decisions}` override this.",
        "",
        "| rule | injected | found (recall) | right on injected | base credited | collateral "
        "| precision | acts | why |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rule, e in evidence.items():
        recall = "–" if e["recall"] is None else f"{e['found']} ({e['recall']:.1%})"
        if e["precision"] is None:
            precision = "–"
        elif e.get("base"):  # of the changes it would make on the split as given
            precision = f"{e['precision']:.1%} of {e['base']} changes"
        else:
            precision = f"{e['precision']:.1%} (injected)"
        injected = f"{e.get('right_on_injected', '–')} of {e.get('on_injected', '–')}"
        base = f"{e.get('credited', '–')} of {e.get('base', '–')}"
        lines.append(
            f"| {rule} | {e['injected']} | {recall} | {injected} | {base} | "
            f"{e.get('collateral', '–')} | {precision} | {'yes' if e['acts'] else 'no'} | "
            f"{e['reason']} |"
        )
    box = metrics.get("box_classifier") or {}
    if box.get("features"):
        acc = ", ".join(f"{k} {v:.3f}" for k, v in box["out_of_fold_accuracy"].items())
        lines += ["", f"Box classifier features: {box['features']} (out-of-fold accuracy: {acc})."]
    return lines


def write_reports(
    findings: list[Finding],
    metrics: dict,
    *,
    paths: dict[tuple[str, int], Path],
    boxes: dict[tuple[str, int], list[float]],
    sources: dict[str, str],
    out_dir: Path,
    cfg: LabelQaCfg | None = None,
    top: int = 60,
) -> list[dict]:
    """Write report.json, report.md with crops of the `top` worst image/box findings under
    images/, and plots/findings.csv. Returns the JSON rows.

    Args:
        paths: (split, image id) -> image file; boxes: (split, annotation id) -> labelled xywh;
        sources: split -> what predicted it for the model-based checks.
        cfg: params' label_qa section, for the policy in force (defaults when None).
    """
    cfg = cfg or LabelQaCfg()
    names = {k: p.name for k, p in paths.items()}
    report = rows(findings, {k: str(v) for k, v in names.items()})
    write_json(out_dir / "report.json", report)
    lines = [
        "# Label QA report",
        "",
        f"Images: {metrics['images']} · annotations: {metrics['annotations']} · "
        f"findings: {metrics['findings']} · error rate: {metrics['error_rate']:.2%}",
        "",
        "Predictions for the model-based checks: "
        + (", ".join(f"{k}: {v}" for k, v in sources.items()) or "off (label_qa.model.enabled)"),
        "",
        f"Review decisions applied (`{cfg.decisions}`): "
        f"{metrics.get('reviewed', {}).get('accept', 0)} accepted, "
        f"{metrics.get('reviewed', {}).get('reject', 0)} rejected; a template of every proposed "
        "change is in review/decisions.yaml, the splits with `qa_` fields in review/<split>.json.",
        "",
        "Model-based rules act (policy) on: "
        + ", ".join(cfg.model.apply_splits or ["none"])
        + "; in the other splits they only report (label_qa.model.apply_splits).",
        "",
        "| rule | severity | policy | findings | what it checks |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in RULES.items():
        doc = " ".join(r.description.split())
        policy = cfg.policy.get(name, r.policy)
        policy += "" if policy == r.policy else f" (default {r.policy})"
        lines.append(
            f"| {name} | {r.severity} | {policy} | {metrics['findings_per_rule'][name]} | {doc} |"
        )
    lines += _evidence(metrics, cfg)
    lines += ["", "## Class balance (boxes per class)", ""]
    counts = metrics["class_counts"]
    classes = list(next(iter(counts.values()), {}))
    lines.append("| split | " + " | ".join(classes) + " |")
    lines.append("| --- |" + " --- |" * len(classes))
    for split, c in counts.items():
        lines.append(f"| {split} | " + " | ".join(str(c[k]) for k in classes) + " |")
    lines += [
        "",
        f"## Top findings (red: as labelled, green: suggested fix or the model's box; "
        f"the worst of each rule in turn, {top} at most; all in report.json)",
        "",
    ]
    shown = 0
    with atomic_dir(out_dir / "images") as crops:
        for f in _round_robin(findings):
            if shown >= top or f.image_id is None:
                continue
            try:
                image = read_rgb(paths[(f.split, f.image_id)])
            except (OSError, KeyError):
                continue  # unreadable or unknown images are findings themselves
            labelled = boxes.get((f.split, f.annotation_id))
            name = f"{shown:03d}-{f.rule}-{f.split}-{f.image_id}.png"
            render_crop(image, labelled, _suggested_box(f.fix)).save(crops / name)
            lines += _entry(shown, f, names, name)
            shown += 1
    write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    csv = "rule,findings\n" + "".join(f"{k},{v}\n" for k, v in metrics["findings_per_rule"].items())
    write_text(out_dir / "plots" / "findings.csv", csv)
    return report
