"""The rule registry: every label-QA check is a named rule with a severity and a default policy.

A rule is a function of the whole `QaContext` yielding `Hit`s; the decorators below adapt the
common per-annotation and per-image checks. Adding a rule is adding a decorated function in one of
the rule modules (`boxes`, `images`, `balance`, `model_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.datasets.coco import CocoAnnotation, CocoFile, CocoImage
from tasks.harness.config import LabelQaCfg

Severity = Literal["error", "warning"]
Policy = Literal["drop", "fix", "keep"]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Hit:
    """One item that breaks a rule. `score` is a label-quality score in [0, 1] (lower = more
    surely wrong; 0 for a hard rule violation); `fix` is the suggested fix, if any:
    {"bbox": [x, y, w, h]}, {"category_id": c} or {"add": {"category_id": c, "bbox": [...]}}."""

    split: str
    image_id: int | None
    annotation_id: int | None
    message: str
    score: float = 0.0
    fix: dict | None = None


def finding_score(score: float) -> float:
    """A hit's score as its Finding records it (4 places): the probe compares scores on this
    scale, so a rule's findings and its hits on the probe's copy round alike."""
    return round(float(score), 4)


@dataclass(frozen=True)
class Finding:
    """A hit with its rule, severity and the action the policy took (drop / fix / keep)."""

    split: str
    image_id: int | None
    annotation_id: int | None
    rule: str
    severity: str
    score: float
    message: str
    fix: dict | None
    action: str
    note: str = ""  # why the action differs from the policy (precision not proven, a review)

    @property
    def key(self) -> str:
        """A stable id: `<split>/<rule>/annotation/<id>` or `<split>/<rule>/image/<id>`."""
        if self.annotation_id is not None:
            return f"{self.split}/{self.rule}/annotation/{self.annotation_id}"
        return f"{self.split}/{self.rule}/image/{self.image_id}"


@dataclass
class SplitData:
    """One COCO file, parsed, with the facts rules share."""

    name: str
    source: Path
    coco: CocoFile
    images: dict[int, CocoImage]
    anns_by_image: dict[int, list[CocoAnnotation]]
    sizes: dict[int, tuple[int, int] | str]  # image id -> decoded (w, h), or the read error
    paths: dict[int, Path]
    hashes: dict[int, np.ndarray]  # image id -> 256-bit perceptual hash (readable images)

    def category_name(self, category_id: int) -> str:
        """The category's name in this file (`#<id>` for an id the file does not list)."""
        for c in self.coco.categories:
            if c.id == category_id:
                return c.name
        return f"#{category_id}"


@dataclass
class QaContext:
    cfg: LabelQaCfg
    root: Path
    splits: dict[str, SplitData]
    # (split, annotation id) / (split, image id) that phase-1 errors remove: model checks skip them
    bad_annotations: set[tuple[str, int]] = field(default_factory=set)
    bad_images: set[tuple[str, int]] = field(default_factory=set)
    # split -> image id -> per-class list of (N, 5) [x0, y0, x1, y1, score] arrays, original px
    predictions: dict[str, dict[int, list]] | None = None
    prediction_source: dict[str, str] = field(default_factory=dict)
    # the splits with phase-1 policy applied (what the model checks train on and score)
    interim: dict[str, dict] = field(default_factory=dict)
    model_scores: dict = field(default_factory=dict)  # cache shared by the model-based rules
    crossfit_map50: float | None = None  # mean held-out mAP@0.5 of the fold models
    crossfit_folds: list[list[int]] = field(default_factory=list)  # train image ids per fold
    seed: int = 0  # of the cross-fit and the box classifier (params train.seed)
    box_accuracy: float | None = None  # out-of-fold accuracy of the box classifier on train
    box_features: str | None = None  # the box classifier's feature set, chosen out of fold
    box_trusted: bool | None = None  # its out-of-fold accuracy reached min_box_accuracy
    box_feature_accuracy: dict[str, float] = field(default_factory=dict)  # per candidate set
    # the probe (probe.py): train annotation id -> the run's out-of-fold box-classifier
    # probabilities, reused on its copy instead of re-fitting (they do not read the label)
    box_oof: dict[int, np.ndarray] | None = None
    # model rule -> its precision / recall measured on injected errors (probe.py)
    fix_evidence: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    name: str
    severity: Severity
    policy: Policy  # default action; params `label_qa.policy.<name>` overrides it
    phase: int  # 1: structural (on the raw files); 2: model-based (after phase-1 errors go)
    description: str
    check: Callable[[QaContext], Iterator[Hit]]


RULES: dict[str, Rule] = {}


def dataset_rule(name: str, severity: Severity, policy: Policy, phase: int = 1):
    """Register `fn(ctx) -> Iterator[Hit]` as rule `name`; its docstring is the description."""

    def register(fn: Callable[[QaContext], Iterator[Hit]]):
        if name in RULES:
            raise ValueError(f"label-QA rule {name!r} registered twice")
        RULES[name] = Rule(name, severity, policy, phase, (fn.__doc__ or "").strip(), fn)
        return fn

    return register


@dataclass(frozen=True)
class Issue:
    """What a per-item check returns when the item breaks its rule."""

    message: str
    score: float = 0.0
    fix: dict | None = None


def annotation_rule(name: str, severity: Severity, policy: Policy):
    """Register `fn(ctx, split, annotation) -> Issue | None`, run on every annotation."""

    def register(fn: Callable[[QaContext, SplitData, CocoAnnotation], Issue | None]):
        def check(ctx: QaContext) -> Iterator[Hit]:
            for sd in ctx.splits.values():
                for a in sd.coco.annotations:
                    if (issue := fn(ctx, sd, a)) is not None:
                        yield Hit(sd.name, a.image_id, a.id, issue.message, issue.score, issue.fix)

        check.__doc__ = fn.__doc__
        dataset_rule(name, severity, policy)(check)
        return fn

    return register


def image_rule(name: str, severity: Severity, policy: Policy):
    """Register `fn(ctx, split, image) -> Issue | None`, run on every image."""

    def register(fn: Callable[[QaContext, SplitData, CocoImage], Issue | None]):
        def check(ctx: QaContext) -> Iterator[Hit]:
            for sd in ctx.splits.values():
                for im in sd.coco.images:
                    if (issue := fn(ctx, sd, im)) is not None:
                        yield Hit(sd.name, im.id, None, issue.message, issue.score, issue.fix)

        check.__doc__ = fn.__doc__
        dataset_rule(name, severity, policy)(check)
        return fn

    return register
