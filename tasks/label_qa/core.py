"""The label-QA run: parse the splits, run the registered rules in two phases, apply the policy.

Phase 1 runs the structural rules on the raw files. Their errors are removed (or fixed) to give
the interim splits the model-based rules (phase 2) train on and score. The cleaned manifest is the
raw splits with every finding's action applied: drop removes the annotation (or the image, for an
image finding), fix applies the suggested fix (a rule with no suggestion for that item falls back
to drop for an error, keep for a warning), keep leaves it. The model-based rules act only on the
splits in `label_qa.model.apply_splits` (train by default); elsewhere they only report, and
they change labels only where their precision, measured on errors injected into a copy of
train, is proven (`probe.py`). A reviewer's decisions (`review.py`) override all of this. The
error rate is the share of images carrying at least one `error` finding.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tasks.datasets.coco import load_coco, load_manifest_split, read_rgb, resolve_image
from tasks.harness.config import LabelQaCfg, TrainCfg
from tasks.harness.errors import ConfigError
from tasks.label_qa import (  # noqa: F401  (register rules)
    balance,
    boxes,
    crossfit,
    ids,
    images,
    model_checks,
    probe,
    review,
)
from tasks.label_qa.balance import class_counts
from tasks.label_qa.images import phash
from tasks.label_qa.registry import (
    RULES,
    SPLITS,
    Finding,
    Hit,
    QaContext,
    Rule,
    SplitData,
    finding_score,
)
from tasks.metrics.detection import Runner
from tasks.models.config import ModelCfg

log = logging.getLogger(__name__)


@dataclass
class QaResult:
    """Unpacks as (findings, manifest, metrics); `ctx` keeps the parsed splits for reports."""

    findings: list[Finding]
    manifest: dict  # {"root": dataset, "splits": {split: cleaned COCO dict}}
    metrics: dict
    ctx: QaContext

    def __iter__(self) -> Iterator:
        return iter((self.findings, self.manifest, self.metrics))

    def image_paths(self) -> dict[tuple[str, int], Path]:
        return {(s, i): p for s, sd in self.ctx.splits.items() for i, p in sd.paths.items()}

    def boxes(self) -> dict[tuple[str, int], list[float]]:
        return {
            (s, a.id): list(a.bbox)
            for s, sd in self.ctx.splits.items()
            for a in sd.coco.annotations
        }


def load_split(root: Path, split: str, manifest: Path | None = None) -> SplitData:
    """Parse `<root>/<split>.json` (or the split of `ingest`'s manifest file, whose images lie
    under its `root`) and decode every image once (size and perceptual hash).

    Raises:
        DataError: not UTF-8 JSON, a schema error, or an image path escaping `root`.
    """
    if manifest is None:
        source = root / f"{split}.json"
        coco = load_coco(source)
    else:
        source = manifest
        root, coco = load_manifest_split(manifest, split)
    sizes: dict[int, tuple[int, int] | str] = {}
    paths, hashes = {}, {}
    for i, im in enumerate(coco.images):
        path = resolve_image(root, im.file_name, source, f"images[{i}].file_name")
        paths[im.id] = path
        try:
            rgb = read_rgb(path)
        except FileNotFoundError:
            sizes[im.id] = "file not found"
            continue
        except OSError as e:  # PIL raises OSError subclasses for truncated / corrupt files
            sizes[im.id] = f"{type(e).__name__}: {e}"
            continue
        sizes[im.id] = (rgb.shape[1], rgb.shape[0])
        hashes[im.id] = phash(rgb)
    by_image: dict = {}
    for a in coco.annotations:
        by_image.setdefault(a.image_id, []).append(a)
    return SplitData(
        split, source, coco, {im.id: im for im in coco.images}, by_image, sizes, paths, hashes
    )


def action_for(rule: Rule, hit: Hit | Finding, cfg: LabelQaCfg, policy: dict | None = None) -> str:
    """What the policy (`cfg.policy`, or `policy` when given) does with one hit (see the module
    docstring); model-based rules act only in `label_qa.model.apply_splits`."""
    action = (cfg.policy if policy is None else policy).get(rule.name, rule.policy)
    if hit.image_id is None:
        return "keep"  # a dataset-level finding (class balance): nothing to remove
    if rule.phase == 2 and hit.split not in cfg.model.apply_splits:
        return "keep"
    fix = hit.fix
    if action == "fix" and fix is None:
        return "drop" if rule.severity == "error" else "keep"
    return action


def apply_policy(ctx: QaContext, findings: list[Finding]) -> dict[str, dict]:
    """The splits as COCO dicts with every finding's action applied."""
    drop_images = {
        (f.split, f.image_id)
        for f in findings
        if f.action == "drop" and f.annotation_id is None and f.image_id is not None
    }
    drop_anns = {(f.split, f.annotation_id) for f in findings if f.action == "drop"}
    fixes: dict[tuple[str, int], list[Finding]] = {}
    adds: dict[str, list[Finding]] = {}
    for f in findings:
        if f.action != "fix":
            continue
        if f.annotation_id is not None:
            fixes.setdefault((f.split, f.annotation_id), []).append(f)
        elif "add" in f.fix:
            adds.setdefault(f.split, []).append(f)
    out = {}
    for name, sd in ctx.splits.items():
        kept_images = [im for im in sd.coco.images if (name, im.id) not in drop_images]
        kept_ids = {im.id for im in kept_images}
        anns = []
        for a in sd.coco.annotations:
            if (name, a.id) in drop_anns or a.image_id not in kept_ids:
                continue
            row = a.model_dump()
            for f in fixes.get((name, a.id), []):
                row.update({k: v for k, v in f.fix.items() if k in ("bbox", "category_id")})
                row.setdefault("qa_fixed_by", []).append(f.rule)
            row["area"] = row["bbox"][2] * row["bbox"][3]
            anns.append(row)
        next_id = max((a.id for a in sd.coco.annotations), default=0) + 1
        for f in adds.get(name, []):
            if f.image_id in kept_ids:
                box = f.fix["add"]
                anns.append(
                    {
                        "id": next_id,
                        "image_id": f.image_id,
                        "category_id": box["category_id"],
                        "bbox": box["bbox"],
                        "area": box["bbox"][2] * box["bbox"][3],
                        "iscrowd": 0,
                        "qa_added_by": f.rule,
                    }
                )
                next_id += 1
        out[name] = {
            "images": [im.model_dump() for im in kept_images],
            "annotations": anns,
            "categories": [c.model_dump() for c in sd.coco.categories],
        }
    return out


def run_rules(ctx: QaContext, phase: int) -> list[Finding]:
    """Every registered rule of `phase` on `ctx`, as findings with the policy's action."""
    findings = []
    for rule in RULES.values():
        if rule.phase != phase:
            continue
        for h in rule.check(ctx):
            action = action_for(rule, h, ctx.cfg)
            findings.append(
                Finding(
                    h.split,
                    h.image_id,
                    h.annotation_id,
                    rule.name,
                    rule.severity,
                    finding_score(h.score),
                    h.message,
                    h.fix,
                    action,
                )
            )
    return findings


def gate_model_fixes(ctx: QaContext, findings: list[Finding]) -> list[Finding]:
    """`findings` where every model-based (phase 2) finding whose rule's precision is not proven
    (`ctx.fix_evidence`, see `probe.py`) is only reported: its action becomes keep, with a note."""
    out = []
    for f in findings:
        if RULES[f.rule].phase == 2 and f.action != "keep":
            ev = ctx.fix_evidence.get(f.rule)
            if not (ev and ev["acts"]):
                why = ev["reason"] if ev else "reports only: not measured"
                f = replace(f, action="keep", note=f"would {f.action}; {why}")
        out.append(f)
    return out


def model_findings(ctx: QaContext) -> list[Finding]:
    """The model-based rules on `ctx.predictions`: their findings, each rule measured on
    injected errors (`probe.measure`, into ctx.fix_evidence) and its fixes gated on it."""
    findings = run_rules(ctx, phase=2)
    ctx.fix_evidence = probe.measure(ctx, findings)
    return gate_model_fixes(ctx, findings)


def run(
    cfg: LabelQaCfg,
    *,
    dataset: Path,
    train_cfg: TrainCfg | None = None,
    model_cfg: ModelCfg | None = None,
    champion: tuple[Runner, int] | None = None,
    decisions: Path | None = None,
) -> QaResult:
    """Check every split under `dataset` and build the cleaned manifest.

    Args:
        cfg: the label_qa section of params.yaml.
        dataset: root holding {train,val,test}.json and the images they name, or the manifest
            file `ingest` writes.
        train_cfg: batch size, seed, threads and AMP of the cross-fit (params `train`).
        model_cfg: the model family the cross-fit trains (params `model`).
        champion: (runner, input size) of the registry's champion, to score val/test with.
        decisions: a reviewer's decisions file (`review.py`); they override everything else.
    Returns:
        findings, the cleaned manifest and the metrics.
    Raises:
        DataError: a file is unusable (not JSON, schema, a path escaping the root), or the
            decisions file is malformed or names what the splits do not hold.
        ConfigError: `label_qa.policy` names a rule that does not exist.
    """
    unknown = sorted(set(cfg.policy) - set(RULES))
    if unknown:
        raise ConfigError(
            f"params.yaml: label_qa.policy.{unknown[0]}: unknown rule; "
            f"choose one of {', '.join(RULES)}"
        )
    dataset = Path(dataset)
    manifest = dataset if dataset.is_file() else None  # ingest's manifest.json
    if manifest is not None:
        dataset = load_manifest_split(manifest, "train")[0]
    ctx = QaContext(cfg, dataset, {s: load_split(dataset, s, manifest) for s in SPLITS})
    reviewed = review.load_decisions(decisions, ctx) if decisions is not None else []
    findings = run_rules(ctx, phase=1)
    ctx.interim = apply_policy(ctx, findings)
    for f in findings:
        if f.severity == "error" and f.annotation_id is not None:
            ctx.bad_annotations.add((f.split, f.annotation_id))
        elif f.severity == "error" and f.image_id is not None:
            ctx.bad_images.add((f.split, f.image_id))
    model_s = 0.0
    if cfg.model.enabled:
        t0 = time.perf_counter()
        crossfit.predict_splits(ctx, train_cfg or TrainCfg(), model_cfg or ModelCfg(), champion)
        findings += model_findings(ctx)
        model_s = time.perf_counter() - t0
    if reviewed:
        findings = review.apply_decisions(findings, reviewed, ctx, decisions)
    cleaned = apply_policy(ctx, findings)
    images_total = sum(len(sd.coco.images) for sd in ctx.splits.values())
    flagged = {  # a reviewer's reject says the label is right: not an error
        (f.split, f.image_id)
        for f in findings
        if f.severity == "error" and not f.note.startswith("rejected in review")
    }
    by_rule = Counter(f.rule for f in findings)
    by_action = Counter(f.action for f in findings if f.image_id is not None)
    metrics = {
        "images": images_total,
        "annotations": sum(len(sd.coco.annotations) for sd in ctx.splits.values()),
        "findings": len(findings),
        "error_rate": len(flagged) / max(images_total, 1),
        "findings_per_rule": {name: by_rule.get(name, 0) for name in RULES},
        "errors_per_rule": {
            name: by_rule.get(name, 0) for name, r in RULES.items() if r.severity == "error"
        },
        "actions": {a: by_action.get(a, 0) for a in ("drop", "fix", "keep")},
        "kept": {
            s: {"images": len(c["images"]), "annotations": len(c["annotations"])}
            for s, c in cleaned.items()
        },
        "class_counts": class_counts(ctx),
        "model_checks_s": round(model_s, 2),
        "crossfit_map50": ctx.crossfit_map50,
        "fix_evidence": ctx.fix_evidence,
        "box_classifier": {
            "features": ctx.box_features,
            "out_of_fold_accuracy": ctx.box_feature_accuracy,
        },
        "reviewed": {
            d: sum(f.note.startswith(f"{d}ed in review") for f in findings)
            for d in ("accept", "reject")
        },
    }
    manifest = {"root": str(dataset), "splits": cleaned}
    return QaResult(findings, manifest, metrics, ctx)
