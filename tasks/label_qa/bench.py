"""The label-QA benchmark: inject known label noise into the default data, measure what label QA
finds (recall per noise kind, precision per rule, against the injected ground truth), what the
stage costs (with and without the cross-fit), and what cleaning is worth to the detector (test
mAP after training on the clean, the noisy and the cleaned manifests, same seed; also on the
noisy data cleaned with the model rules only reporting, and on the clean data cleaned, which is
what the policy costs where the labels were right).

    shrinkflow bench-label-qa --rate 0.05            # -> artifacts/bench/label-qa-default.json
    shrinkflow bench-label-qa --dataset shapes       # -> artifacts/bench/label-qa-shapes.json

`--dataset shapes` runs the same on the coloured-shapes set (`tasks/datasets/shapes.py`: class =
colour),
the harder one where a colour-blind checker rewrites correct labels.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tasks.datasets.digits import NOISE_FILE, NOISE_KINDS
from tasks.datasets.digits import run as make_data
from tasks.datasets.shapes import ShapesCfg, generate
from tasks.harness.config import LabelNoiseCfg, Params
from tasks.label_qa.boxes import iou_matrix
from tasks.label_qa.core import QaResult, action_for, apply_policy
from tasks.label_qa.core import run as run_qa
from tasks.label_qa.registry import RULES, SPLITS, Finding

log = logging.getLogger(__name__)
# which rule is meant to catch which injected kind (precision is per rule)
RULE_FOR_KIND = {
    "class_swap": ("label_wrong_class",),
    "shift": ("box_badly_placed",),
    "scale": ("box_badly_placed",),
    "drop": ("box_missing",),
    "duplicate": ("duplicate_box",),
}
MODEL_RULES = ("label_wrong_class", "box_badly_placed", "box_missing")
DROP_MATCH_IOU = 0.3  # a box_missing suggestion this close to a dropped box finds it


def score_findings(findings: list[Finding], injected: list[dict]) -> dict:
    """Recall per injected kind (any finding on the corrupted item counts; a dropped box counts
    as found when a `box_missing` suggestion overlaps it with IoU >= 0.3) and precision per rule
    (its findings in the noisy splits that point at an injected error of any kind; an image
    finding is right when the image carries one)."""
    splits = {r["split"] for r in injected}
    on_ann = {(f.split, f.annotation_id) for f in findings if f.annotation_id is not None}
    missing: dict[tuple[str, int], list[list[float]]] = {}
    for f in findings:
        if f.rule == "box_missing":
            missing.setdefault((f.split, f.image_id), []).append(f.fix["add"]["bbox"])
    bad_anns = set()
    found = {k: 0 for k in NOISE_KINDS}
    total = {k: 0 for k in NOISE_KINDS}
    dropped: dict[tuple[str, int], list[list[float]]] = {}
    for r in injected:
        total[r["kind"]] += 1
        if r["kind"] == "drop":
            key = (r["split"], r["image_id"])
            dropped.setdefault(key, []).append(r["original"]["bbox"])
            cands = missing.get(key, [])
            hit = cands and iou_matrix(np.array([r["original"]["bbox"]]), np.array(cands)).max()
            found["drop"] += bool(hit and hit >= DROP_MATCH_IOU)
        else:
            bad_anns.add((r["split"], r["annotation_id"]))
            found[r["kind"]] += (r["split"], r["annotation_id"]) in on_ann
    noisy_images = {(r["split"], r["image_id"]) for r in injected}
    per_rule: dict[str, dict] = {}
    for f in findings:
        if f.split not in splits or f.image_id is None:
            continue
        if f.rule == "box_missing":
            near = dropped.get((f.split, f.image_id), [])
            ok = bool(near) and iou_matrix(np.array([f.fix["add"]["bbox"]]), np.array(near)).max()
            ok = bool(ok and ok >= DROP_MATCH_IOU)
        elif f.annotation_id is None:  # an image finding: right if the image was corrupted
            ok = (f.split, f.image_id) in noisy_images
        else:
            ok = (f.split, f.annotation_id) in bad_anns
        row = per_rule.setdefault(f.rule, {"findings": 0, "true": 0})
        row["findings"] += 1
        row["true"] += ok
    for row in per_rule.values():
        row["precision"] = row["true"] / row["findings"]
    kinds = {
        k: {
            "injected": total[k],
            "found": found[k],
            "recall": found[k] / total[k] if total[k] else None,
            "precision_of_rule": {
                r: per_rule.get(r, {}).get("precision") for r in RULE_FOR_KIND[k]
            },
        }
        for k in NOISE_KINDS
    }
    n_true = sum(r["true"] for r in per_rule.values())
    n_all = sum(r["findings"] for r in per_rule.values())
    return {
        "kinds": kinds,
        "rules": per_rule,
        "recall": sum(found.values()) / max(sum(total.values()), 1),
        "precision": n_true / max(n_all, 1),
    }


def labels_changed(result: QaResult) -> int:
    """Train labels the cleaned manifest changed: fixed or added boxes, and dropped ones."""
    raw = len(result.ctx.splits["train"].coco.annotations)
    kept = result.manifest["splits"]["train"]["annotations"]
    touched = sum(bool(a.get("qa_fixed_by") or a.get("qa_added_by")) for a in kept)
    added = sum(bool(a.get("qa_added_by")) for a in kept)
    return touched + raw - (len(kept) - added)


def raw_manifest(dataset: Path) -> dict:
    """The dataset as it is (no label QA): what `train` would read without cleaning."""
    return {
        "root": str(dataset),
        "splits": {s: json.loads((dataset / f"{s}.json").read_text()) for s in SPLITS},
    }


def policy_manifest(result: QaResult, overrides: dict[str, str]) -> dict:
    """The cleaned manifest `result` would give with `overrides` on top of params' policy: the
    same findings, their actions recomputed."""
    policy = {**result.ctx.cfg.policy, **overrides}
    findings = [
        replace(f, action=action_for(RULES[f.rule], f, result.ctx.cfg, policy))
        for f in result.findings
    ]
    return {"root": result.manifest["root"], "splits": apply_policy(result.ctx, findings)}


def train_and_test(params: Params, manifest: dict, test_manifest: dict, epochs: int) -> dict:
    """Train the project's detector on `manifest`'s train split (params.train, `epochs`) and
    return its metrics on the test split of `test_manifest` (the clean labels: every variant is
    judged against the same ground truth, whatever a policy did to its own test split)."""
    from tasks.datasets.coco import DetectionSet
    from tasks.models import adapter_for
    from tasks.models.training import evaluate_model, fit
    from tasks.preprocess.letterbox import build_size

    cfg = params.train.model_copy(update={"epochs": epochs})
    t0 = time.perf_counter()
    tr = DetectionSet(manifest, "train", cfg.input_size)
    val = DetectionSet(manifest, "val", cfg.input_size)
    adapter = adapter_for(params.model)
    model = adapter.build(len(tr.categories), build_size(cfg.input_size), cfg.seed)
    model, _ = fit(adapter, model, cfg, train=tr, val=val, epochs=epochs, lr=cfg.lr)
    test = evaluate_model(adapter, model, DetectionSet(test_manifest, "test", cfg.input_size))
    return {
        "map50": test["map50"],
        "map50_95": test["map50_95"],
        "train_s": time.perf_counter() - t0,
    }


def make_dataset(params: Params, dataset: str, noise: LabelNoiseCfg, out_dir: Path) -> int:
    """Compose the benchmark's `dataset` ("digits": params.data; "shapes": `ShapesCfg`
    defaults) with `noise` into `out_dir`; returns its seed (`data.seed` + 1: the label_qa.model
    thresholds were tuned on seed 0, so measure on fresh data)."""
    seed = params.data.seed + 1
    if dataset == "shapes":
        generate(ShapesCfg(seed=seed, noise=noise), out_dir)
    else:
        make_data(params.data.model_copy(update={"seed": seed, "noise": noise}), out_dir=out_dir)
    return seed


def run_benchmark(
    params: Params,
    work: Path,
    rate: float,
    epochs: int,
    train: bool,
    clean_check: bool = True,
    on_partial=None,
    dataset: str = "digits",
) -> dict:
    """The whole benchmark under `work` (see the module docstring) on `dataset` (digits or
    shapes). `on_partial(result)` gets the result after the label-QA part and after each
    training run (long runs save as they go)."""
    noise = params.data.noise.model_copy(update=dict.fromkeys(NOISE_KINDS, rate))
    clean_dir, noisy_dir = work / "clean", work / "noisy"
    quiet = noise.model_copy(update=dict.fromkeys(NOISE_KINDS, 0.0))
    make_dataset(params, dataset, quiet, clean_dir)
    seed = make_dataset(params, dataset, noise, noisy_dir)
    injected = json.loads((noisy_dir / NOISE_FILE).read_text())["injected"]
    qa = params.label_qa
    save = on_partial or (lambda r: None)
    t0 = time.perf_counter()
    rules_only = run_qa(
        qa.model_copy(update={"model": qa.model.model_copy(update={"enabled": False})}),
        dataset=noisy_dir,
    )
    result = {
        "dataset": dataset,
        "data_seed": seed,
        "rate_per_kind": rate,
        "injected": {k: sum(r["kind"] == k for r in injected) for k in NOISE_KINDS},
        "detection_rules_only": score_findings(rules_only.findings, injected),
        "stage_s": {"without_crossfit": time.perf_counter() - t0},
        "label_qa": {"config": qa.model_dump(mode="json")},
    }
    save(result)
    t0 = time.perf_counter()
    with_model = run_qa(qa, dataset=noisy_dir, train_cfg=params.train, model_cfg=params.model)
    result["stage_s"]["with_crossfit"] = time.perf_counter() - t0
    result["stage_s"]["model_checks"] = with_model.metrics["model_checks_s"]
    result["crossfit_map50"] = {"noisy": with_model.metrics["crossfit_map50"]}
    result["detection"] = score_findings(with_model.findings, injected)
    result["error_rate"] = {"noisy": with_model.metrics["error_rate"]}
    result["fix_evidence"] = {"noisy": with_model.metrics["fix_evidence"]}
    result["actions"] = {"noisy": with_model.metrics["actions"]}
    save(result)
    on_clean = None
    if clean_check:  # false findings on clean labels (what the gate sees on the default data)
        t0 = time.perf_counter()
        on_clean = run_qa(qa, dataset=clean_dir, train_cfg=params.train, model_cfg=params.model)
        result["stage_s"]["clean_data_with_crossfit"] = time.perf_counter() - t0
        result["crossfit_map50"]["clean"] = on_clean.metrics["crossfit_map50"]
        result["error_rate"]["clean"] = on_clean.metrics["error_rate"]
        result["clean_data_findings"] = {
            k: v for k, v in on_clean.metrics["findings_per_rule"].items() if v
        }
        result["clean_data_actions"] = on_clean.metrics["actions"]
        result["fix_evidence"]["clean"] = on_clean.metrics["fix_evidence"]
        result["clean_data_labels_changed"] = labels_changed(on_clean)
    save(result)
    if train:
        clean = raw_manifest(clean_dir)
        report_only = dict.fromkeys(MODEL_RULES, "keep")
        manifests = {
            "clean": clean,
            "noisy": raw_manifest(noisy_dir),
            "cleaned": with_model.manifest,  # params' policy
            "cleaned_report_only": policy_manifest(with_model, report_only),
        }
        if on_clean is not None:  # what the policy costs where the labels were right
            manifests["clean_cleaned"] = on_clean.manifest
        maps = {}
        for name, m in manifests.items():
            maps[name] = train_and_test(params, m, clean, epochs)
            log.info("train on %s labels: test mAP@0.5 %.4f", name, maps[name]["map50"])
            save({**result, "training": {"epochs": epochs, "test": maps}})
        lost = maps["clean"]["map50"] - maps["noisy"]["map50"]
        cleaned_gain = maps["cleaned"]["map50"] - maps["noisy"]["map50"]
        result["training"] = {
            "epochs": epochs,
            "cleaning_helps": bool(cleaned_gain > 0),
            "map50_cleaned_minus_noisy": cleaned_gain,
            "policy": {r: qa.policy.get(r, RULES[r].policy) for r in MODEL_RULES},
            "apply_splits": qa.model.apply_splits,
            "test": maps,
            "map50_lost_to_noise": lost,
            "map50_recovered_share": {
                name: (maps[name]["map50"] - maps["noisy"]["map50"]) / lost if lost > 0 else None
                for name in ("cleaned", "cleaned_report_only")
            },
        }
    return result
