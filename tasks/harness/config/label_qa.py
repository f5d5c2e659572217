"""Section `label_qa`: the rules, the cross-fit detector and the fix policy."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.harness.sections import InputSize, PosInt, Section


class LabelQaModelCfg(Section):
    """Model-based label checks (cleanlab's ObjectLab scores on out-of-sample predictions)."""

    enabled: bool = Field(True, description="run the model-based checks at all")
    champion: bool = Field(
        True,
        description="score val/test with the registry's `champion` when one exists (it never "
        "saw them); train is always scored by the cross-fit",
    )
    folds: int = Field(3, ge=2, le=10, description="K of the K-fold cross-fit on train")
    epochs: PosInt = Field(40, description="training epochs per fold")
    input_size: InputSize = Field(
        (128, 128), description="fold model input, px: one side or [width, height] (as train's)"
    )
    width: float = Field(
        0.5,
        gt=0,
        le=4,
        description="fold model channel multiplier (the built-in detector: it overrides "
        "model.centernet.width)",
    )
    lr: float = Field(8e-3, gt=0, description="fold model peak learning rate")
    min_map50: float = Field(
        0.2,
        ge=0,
        le=1,
        description="skip the model checks when the fold models' mean "
        "held-out mAP@0.5 is lower (too weak to judge labels)",
    )
    box_classifier: bool = Field(
        True,
        description="also classify each labelled box's pixels (cross-fitted on train) and "
        "flag the boxes whose class cleanlab's confident learning doubts (label_wrong_class)",
    )
    min_box_accuracy: float = Field(
        0.8,
        ge=0,
        le=1,
        description="skip the box classifier when its out-of-fold accuracy on the train "
        "boxes is lower (too weak to judge classes)",
    )
    apply_splits: list[Literal["train", "val", "test"]] = Field(
        ["train"],
        description="splits whose labels the model rules' policy may change; elsewhere their "
        "findings are only reported (val/test are the KPI reference: a model does not rewrite "
        "them unreviewed)",
    )
    swap_threshold: float = Field(
        0.4, ge=0, le=1, description="flag a box as wrong class below this swap score"
    )
    badloc_threshold: float = Field(
        0.6, ge=0, le=1, description="flag a box as badly placed below this location score"
    )
    overlooked_threshold: float = Field(
        0.5, ge=0, le=1, description="flag a missing box below this overlooked score"
    )
    high_probability: float = Field(
        0.7, gt=0, lt=1, description="calibrated confidence a prediction needs to count for swap"
    )
    missing_probability: float = Field(
        0.08, gt=0, lt=1, description="calibrated confidence a prediction needs to count as missing"
    )
    low_probability: float = Field(
        0.04, gt=0, lt=1, description="calibrated confidence a prediction needs for bad location"
    )


class LabelQaCfg(Section):
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="fail the run when the share of flagged images exceeds this"
    )
    min_box_px: float = Field(1.0, ge=0, description="boxes narrower/shorter than this are flagged")
    max_aspect: float = Field(8.0, gt=1, description="flag boxes longer than this times wide")
    duplicate_iou: float = Field(
        0.7, gt=0, le=1, description="same-class boxes overlapping this much are duplicates"
    )
    conflict_iou: float = Field(
        0.8, gt=0, le=1, description="boxes of different classes overlapping this much conflict"
    )
    near_duplicate_bits: int = Field(
        24,
        ge=0,
        le=256,
        description="images whose 256-bit perceptual hashes differ in at most "
        "this many bits are (near-)duplicates",
    )
    min_class_count: int = Field(
        10, ge=0, description="warn when a class has fewer boxes than this in a split"
    )
    policy: dict[str, Literal["drop", "fix", "keep"]] = Field(
        {},
        description="per rule: drop, fix (apply the suggested fix) or keep; "
        "rules not named use their default (see tasks/label_qa rules)",
    )
    model: LabelQaModelCfg = Field(default_factory=lambda: LabelQaModelCfg())
    min_fix_precision: float = Field(
        0.9,
        ge=0,
        le=1,
        description="a model-based rule changes labels only when its precision, measured each run "
        "on errors injected into a copy of the train split, is at least this; else it reports",
    )
    probe_rate: float = Field(
        0.1,
        gt=0,
        le=0.25,
        description="share of the train boxes corrupted per rule in that measurement (class swaps; "
        "shifted or scaled boxes; dropped boxes)",
    )
    max_own_error_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="the largest share of train boxes per error kind the precision measurement "
        "believes are the data's own errors: a model rule's changes that its injected copy "
        "cannot explain are credited as right only up to its recall times this many; the rest "
        "count as false alarms (0: every such change is a false alarm)",
    )
    decisions: str = Field(
        "label_qa/decisions.yaml",
        min_length=1,
        description="a reviewer's accept / reject per finding (YAML; the stage writes a template "
        "to review/decisions.yaml); decisions override the model and the policy; a DVC dep of "
        "the stage; an absent file means no decisions",
    )
