"""Stage `label_qa`: structural checks of a COCO dataset, a findings report, the cleaned manifest
that `train` reads, and a gate on the error rate.

Rules are registered by name with a severity; `error` findings remove the image or annotation
from the manifest, `warning` findings are reported and kept. The error rate is the share of images
that carry an error finding (on the image itself or on one of its annotations).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from tasks.cli import stage_entry
from tasks.coco import CocoAnnotation, CocoFile, CocoImage, load_coco, read_rgb, resolve_image
from tasks.config import LabelQaCfg
from tasks.errors import DataQualityError
from tasks.io import meta, remove, write_json, write_text

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Finding:
    split: str
    image_id: int | None
    annotation_id: int | None
    rule: str
    severity: str
    message: str


@dataclass(frozen=True)
class Rule:
    name: str
    severity: str  # "error" drops the item from the manifest; "warning" keeps it
    scope: str  # "image" or "annotation"
    check: Callable[..., str | None]  # returns a message when the item breaks the rule


RULES: dict[str, Rule] = {}


def rule(name: str, severity: str, scope: str):
    def register(fn: Callable[..., str | None]) -> Callable[..., str | None]:
        RULES[name] = Rule(name, severity, scope, fn)
        return fn

    return register


@dataclass
class Context:
    cfg: LabelQaCfg
    root: Path
    source: Path
    images: dict[int, CocoImage]
    category_ids: set[int]
    sizes: dict[int, tuple[int, int] | str]  # image id -> decoded (w, h), or the read error


@rule("image_unreadable", "error", "image")
def _unreadable(ctx: Context, im: CocoImage) -> str | None:
    got = ctx.sizes[im.id]
    return f"cannot read {im.file_name}: {got}" if isinstance(got, str) else None


@rule("image_size_mismatch", "error", "image")
def _size_mismatch(ctx: Context, im: CocoImage) -> str | None:
    got = ctx.sizes[im.id]
    if isinstance(got, tuple) and got != (im.width, im.height):
        return f"{im.file_name} is {got[0]}x{got[1]}, the JSON says {im.width}x{im.height}"
    return None


@rule("unknown_image", "error", "annotation")
def _unknown_image(ctx: Context, a: CocoAnnotation) -> str | None:
    return None if a.image_id in ctx.images else f"image_id {a.image_id} is not in images"


@rule("unknown_category", "error", "annotation")
def _unknown_category(ctx: Context, a: CocoAnnotation) -> str | None:
    return None if a.category_id in ctx.category_ids else f"category_id {a.category_id} unknown"


@rule("box_empty", "error", "annotation")
def _box_empty(ctx: Context, a: CocoAnnotation) -> str | None:
    _, _, w, h = a.bbox
    return None if w > 0 and h > 0 else f"bbox {list(a.bbox)} has no positive area"


@rule("box_outside_image", "error", "annotation")
def _box_outside(ctx: Context, a: CocoAnnotation) -> str | None:
    im = ctx.images.get(a.image_id)
    if im is None:
        return None
    x, y, w, h = a.bbox
    tol = 0.5  # sub-pixel rounding in exporters
    if x < -tol or y < -tol or x + w > im.width + tol or y + h > im.height + tol:
        return f"bbox {list(a.bbox)} leaves the {im.width}x{im.height} image"
    return None


@rule("box_too_small", "warning", "annotation")
def _box_small(ctx: Context, a: CocoAnnotation) -> str | None:
    _, _, w, h = a.bbox
    if 0 < min(w, h) < ctx.cfg.min_box_px:
        return f"bbox {w:g}x{h:g} is below min_box_px={ctx.cfg.min_box_px:g}"
    return None


def _decoded_sizes(coco: CocoFile, root: Path, source: Path) -> dict[int, tuple[int, int] | str]:
    sizes: dict[int, tuple[int, int] | str] = {}
    for i, im in enumerate(coco.images):
        path = resolve_image(root, im.file_name, source, f"images[{i}].file_name")
        try:
            h, w, _ = read_rgb(path).shape
            sizes[im.id] = (w, h)
        except FileNotFoundError:
            sizes[im.id] = "file not found"
        except OSError as e:  # PIL raises OSError subclasses for truncated / corrupt files
            sizes[im.id] = f"{type(e).__name__}: {e}"
    return sizes


def check_split(
    cfg: LabelQaCfg, root: Path, source: Path, split: str
) -> tuple[list[Finding], dict, int]:
    """Run every registered rule on one COCO file; return findings and the cleaned COCO dict."""
    coco = load_coco(source)
    ctx = Context(
        cfg,
        root,
        source,
        {im.id: im for im in coco.images},
        {c.id for c in coco.categories},
        _decoded_sizes(coco, root, source),
    )
    findings: list[Finding] = []
    bad_images, bad_anns = set(), set()
    for r in RULES.values():
        items = coco.images if r.scope == "image" else coco.annotations
        for item in items:
            msg = r.check(ctx, item)
            if msg is None:
                continue
            image_id = item.id if r.scope == "image" else item.image_id
            ann_id = None if r.scope == "image" else item.id
            findings.append(Finding(split, image_id, ann_id, r.name, r.severity, msg))
            if r.severity == "error" and ann_id is None:
                bad_images.add(image_id)
            elif r.severity == "error":
                bad_anns.add(ann_id)
    cleaned = {
        "images": [im.model_dump() for im in coco.images if im.id not in bad_images],
        "annotations": [
            a.model_dump()
            for a in coco.annotations
            if a.id not in bad_anns and a.image_id not in bad_images
        ],
        "categories": [c.model_dump() for c in coco.categories],
    }
    return findings, cleaned, len(coco.images)


def run(cfg: LabelQaCfg, *, dataset: Path) -> tuple[list[Finding], dict, dict]:
    """Check every split under `dataset`.

    Returns:
        findings, the cleaned manifest ({"root", "splits": {split: coco}}), metrics.
    Raises:
        DataError: a file is unusable (not JSON, schema, a path escaping the root).
    """
    findings: list[Finding] = []
    manifest: dict = {"root": str(dataset), "splits": {}}
    total_images = 0
    for split in SPLITS:
        f, cleaned, n = check_split(cfg, dataset, dataset / f"{split}.json", split)
        findings += f
        manifest["splits"][split] = cleaned
        total_images += n
    flagged = {(f.split, f.image_id) for f in findings if f.severity == "error"}
    by_rule = Counter(f.rule for f in findings)
    metrics = {
        "images": total_images,
        "findings": len(findings),
        "error_rate": len(flagged) / max(total_images, 1),
        "findings_per_rule": {name: by_rule.get(name, 0) for name in RULES},
        "kept": {
            s: {"images": len(c["images"]), "annotations": len(c["annotations"])}
            for s, c in manifest["splits"].items()
        },
    }
    return findings, manifest, metrics


def render_markdown(findings: list[Finding], metrics: dict, limit: int = 200) -> str:
    lines = [
        "# Label QA report",
        "",
        f"Images: {metrics['images']} · findings: {metrics['findings']} · "
        f"error rate: {metrics['error_rate']:.2%}",
        "",
        "| rule | findings |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in metrics["findings_per_rule"].items()],
        "",
        "| split | image | annotation | rule | severity | message |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in findings[:limit]:
        lines.append(
            f"| {f.split} | {f.image_id} | {f.annotation_id} | {f.rule} | {f.severity} "
            f"| {f.message} |"
        )
    if len(findings) > limit:
        lines.append(f"\n… and {len(findings) - limit} more in report.json")
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml")),
    dataset: Path = typer.Option(..., help="dataset root with {train,val,test}.json"),
    out: Path = typer.Option(Path("artifacts/label_qa"), help="folder for report and manifest"),
) -> None:
    """Check the dataset, write the report and the cleaned manifest; gate on the error rate."""
    with stage_entry("label_qa", params) as ctx:
        cfg = ctx.params.label_qa
        ctx.log_params(cfg)
        for stale in ("manifest.json", "metrics.json", "report.json", "report.md"):
            remove(out / stale)
        findings, manifest, metrics = run(cfg, dataset=dataset)
        write_json(out / "report.json", [asdict(f) for f in findings])
        write_text(out / "report.md", render_markdown(findings, metrics))
        ctx.log_metrics(metrics)
        ctx.log_artifact(out / "report.json")
        ctx.log_artifact(out / "report.md")
        if metrics["error_rate"] > cfg.max_error_rate:
            tripped = ", ".join(f"{k}={v}" for k, v in metrics["findings_per_rule"].items() if v)
            raise DataQualityError(
                f"label QA gate: error rate {metrics['error_rate']:.2%} exceeds "
                f"label_qa.max_error_rate={cfg.max_error_rate:.2%} ({tripped}); "
                f"see {out / 'report.md'}"
            )
        write_json(out / "manifest.json", manifest)
        write_json(out / "meta.json", meta(cfg, {"dataset": dataset}, ("pycocotools",)))
        write_json(out / "metrics.json", metrics)
        log.info(
            "label QA: %d findings, error rate %.2f%%", len(findings), 100 * metrics["error_rate"]
        )


if __name__ == "__main__":
    app()
