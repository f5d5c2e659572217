"""A second, harder detection set the project builds itself: coloured shapes whose class is colour.

Each class is a colour ("red", "green", "blue", ...); the shape of an object (circle, square,
triangle, blob) is drawn at random and carries no class information, so a model (or a label
checker) that ignores colour cannot tell the classes apart. Canvases are non-square (160x120 by
default) with a textured background, grey clutter, and grey distractors of the same shapes that
are not labelled. Output, in the same COCO layout as the digits (`tasks/datasets/digits.py`):
`<out>/{train,val,test}.json`, `<out>/images/<split>/*.png`, `<out>/meta.json` and, with
`noise` rates above 0, the injected label noise's ground truth in `<out>/noise.json`.

A builtin source of `ingest` (`dataset.format: builtin`, `data.kind: shapes`, knobs in
`data.shapes`: `ShapesCfg`, defined in tasks/harness/config.py); also used by the label-QA tests and
`shrinkflow bench-label-qa --dataset shapes`. `generate` is the API.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.datasets.digits import NOISE_FILE, NOISE_KINDS, SPLITS
from tasks.datasets.label_noise import inject
from tasks.harness.config import ShapesCfg
from tasks.harness.io import atomic_dir, meta, write_json

log = logging.getLogger(__name__)
# RGB in [0, 1] of every colour a class may be named after (jittered per object): the names are
# tasks.harness.config.SHAPE_COLOURS, which ShapesCfg validates against
PALETTE = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.70, 0.18),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.92, 0.85, 0.10),
    "magenta": (0.85, 0.15, 0.80),
    "cyan": (0.10, 0.80, 0.85),
    "orange": (0.95, 0.50, 0.05),
}
SHAPES = ("circle", "square", "triangle", "blob")


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Low-saturation texture: a grey-brown gradient plus blurred noise. float32 (H, W, 3)."""
    base = rng.uniform(0.3, 0.6) + rng.uniform(-0.05, 0.05, size=3)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * gx / w + np.sin(angle) * gy / h) * rng.uniform(-0.2, 0.2)
    grain = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0))
    )
    texture = (np.asarray(grain, np.float32) / 255.0 - 0.5) * rng.uniform(0.2, 0.5)
    img = base[None, None, :] + (grad + texture)[..., None] + rng.normal(0, 0.02, (h, w, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def _shape_mask(rng: np.random.Generator, shape: str, w: int, h: int) -> np.ndarray:
    """float32 (h, w) alpha in [0, 1] of one shape filling its w x h cell."""
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    if shape == "circle":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "triangle":
        apex = rng.uniform(0.2, 0.8) * (w - 1)
        draw.polygon([(apex, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    else:  # blob: a star-convex polygon with random radii
        n = 9
        t = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = rng.uniform(0.6, 1.0, n)
        pts = [
            ((1 + ri * np.cos(ti)) * (w - 1) / 2, (1 + ri * np.sin(ti)) * (h - 1) / 2)
            for ri, ti in zip(r, t, strict=True)
        ]
        draw.polygon(pts, fill=255)
    return np.asarray(layer, np.float32) / 255.0


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    """Grey strokes and rings (no class colour): edges a detector must learn to ignore."""
    h, w = img.shape[:2]
    for _ in range(count):
        layer = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(layer)
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.normal(0, w / 5), y0 + rng.normal(0, h / 5)
            draw.line([x0, y0, x1, y1], fill=255, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(3, min(w, h) / 8)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], outline=255)
        alpha = np.asarray(layer, np.float32)[..., None] / 255.0 * rng.uniform(0.4, 0.9)
        img = img * (1 - alpha) + rng.uniform(0.1, 0.9) * alpha
    return img


def _free_cell(rng, w, h, cw, ch, taken) -> tuple[int, int] | None:
    for _attempt in range(30):
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        if not any(x < a + c and a < x + cw and y < b + d and b < y + ch for a, b, c, d in taken):
            return x, y
    return None


def compose_canvas(rng: np.random.Generator, cfg: ShapesCfg) -> tuple[np.ndarray, list[dict]]:
    """One canvas: uint8 (H, W, 3) and [{"class": index into cfg.classes, "shape", "bbox"}] per
    labelled object (bbox [x, y, w, h] tight around its visible pixels)."""
    w, h = cfg.width, cfg.height
    img = _clutter(rng, _background(rng, w, h), cfg.clutter)
    taken: list[tuple[int, int, int, int]] = []
    placed: list[dict] = []
    n_obj = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    # objects first, then grey distractors, all non-overlapping
    for k in range(n_obj + cfg.distractors):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        side = rng.uniform(*cfg.object_size)
        aspect = rng.uniform(0.75, 1.33)
        cw = max(4, int(round(side * min(1.0, aspect))))
        ch = max(4, int(round(side / max(1.0, aspect))))
        cell = _free_cell(rng, w, h, cw, ch, taken)
        if cell is None:
            continue  # canvas full: skip rather than overlap
        x, y = cell
        alpha = _shape_mask(rng, shape, cw, ch)
        labelled = k < n_obj
        if labelled:
            cls = int(rng.integers(len(cfg.classes)))
            colour = np.array(PALETTE[cfg.classes[cls]]) * rng.uniform(0.8, 1.1)
            colour = colour + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)
        else:
            colour = np.full(3, rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.7, 0.95)]))
        colour = np.clip(colour, 0, 1).astype(np.float32)
        shade = 1 + 0.15 * (np.linspace(-1, 1, ch)[:, None] * rng.choice([-1, 1]))  # (ch, 1)
        fill = np.clip(colour[None, None, :] * shade[..., None], 0, 1)
        patch = img[y : y + ch, x : x + cw]
        img[y : y + ch, x : x + cw] = patch * (1 - alpha[..., None]) + fill * alpha[..., None]
        taken.append((x, y, cw, ch))
        if labelled:
            ys, xs = np.nonzero(alpha > 0.5)
            if not len(xs):
                continue
            bx, by = x + int(xs.min()), y + int(ys.min())
            bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
            placed.append({"class": cls, "shape": shape, "bbox": [bx, by, bw, bh]})
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), placed


def generate(cfg: ShapesCfg, out_dir: Path) -> dict:
    """Write the coloured-shapes set into `out_dir` (atomically). Returns summary metrics:
    per split its images and annotations, and the count of injected noise per kind."""
    categories = [
        {"id": k + 1, "name": name, "supercategory": "colour"} for k, name in enumerate(cfg.classes)
    ]
    counts = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
    metrics: dict = {}
    injected: list[dict] = []
    with atomic_dir(Path(out_dir)) as tmp:
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng([cfg.seed, s])
            (tmp / "images" / split).mkdir(parents=True)
            coco: dict = {"images": [], "annotations": [], "categories": categories}
            for image_id in range(1, counts[split] + 1):
                pixels, placed = compose_canvas(rng, cfg)
                name = f"images/{split}/{image_id:05d}.png"
                Image.fromarray(pixels).save(tmp / name)
                coco["images"].append(
                    {"id": image_id, "file_name": name, "width": cfg.width, "height": cfg.height}
                )
                for p in placed:
                    x, y, w, h = p["bbox"]
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": p["class"] + 1,
                            "bbox": [x, y, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                            "shape": p["shape"],  # not the class: proves shape is uninformative
                        }
                    )
            if split in cfg.noise.splits:
                noise_rng = np.random.default_rng([cfg.seed, s, 7])
                injected += inject(coco, cfg.noise, noise_rng, split)
            write_json(tmp / f"{split}.json", coco)
            metrics[split] = {
                "images": len(coco["images"]),
                "annotations": len(coco["annotations"]),
            }
        metrics["noise"] = {k: sum(r["kind"] == k for r in injected) for k in NOISE_KINDS}
        write_json(tmp / NOISE_FILE, {"config": cfg.noise.model_dump(), "injected": injected})
        write_json(tmp / "meta.json", meta(cfg, {}, ("pillow",)))
    log.info("shapes: wrote %s (%s)", out_dir, metrics)
    return metrics
