"""The built-in default detection set (`dataset.format: builtin` of `ingest`), composed from
scikit-learn's digits.

The 1,797 8x8 handwritten digits are split into train/val/test *before* composing, so no source
digit appears in two splits. Each canvas gets a tinted gradient background, several digits pasted
at varied scales and aspect ratios, and clutter (strokes, rings, blobs) that a detector must learn
to ignore. Output: `<out>/{train,val,test}.json` (COCO) and `<out>/images/<split>/*.png`.
With `data.noise` rates above 0, label noise (class swaps, shifted / scaled / dropped / duplicated
boxes) is injected and its ground truth written to `<out>/noise.json` (to measure label QA).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from tasks.harness.config import DataCfg, LabelNoiseCfg
from tasks.harness.io import atomic_dir, meta, write_json

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
NOISE_FILE = "noise.json"  # ground truth of injected label noise, beside the COCO files


def split_sources(
    n: int, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Disjoint index sets of the source digits, one per split."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A tinted linear gradient with sensor noise: float32 (H, W, 3) in [0, 1]."""
    base = rng.uniform(0.0, 0.45, size=3)
    tilt = rng.uniform(-0.15, 0.15, size=3)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (H, W)
    img = base[None, None, :] + tilt[None, None, :] * grad[..., None]
    img = img + rng.normal(0, 0.03, size=(size, size, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    """Distractors: thin strokes, rings and soft blobs in random colours."""
    size = img.shape[0]
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(count):
        kind = rng.integers(3)
        x0, y0 = rng.uniform(0, size, 2)
        if kind == 0:  # stroke
            x1, y1 = x0 + rng.normal(0, size / 5), y0 + rng.normal(0, size / 5)
            draw.line(
                [x0, y0, x1, y1], fill=int(rng.integers(80, 200)), width=int(rng.integers(1, 3))
            )
        elif kind == 1:  # ring
            r = rng.uniform(3, size / 10)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], outline=int(rng.integers(80, 200)))
        else:  # blob
            r = rng.uniform(2, size / 14)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=int(rng.integers(60, 160)))
    alpha = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
    colour = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    return img * (1 - alpha) + colour * alpha


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    x, y, w, h = box
    return any(
        x < bx + bw and bx < x + w and y < by + bh and by < y + h for bx, by, bw, bh in boxes
    )


def compose_canvas(
    rng: np.random.Generator, digits: np.ndarray, cfg: DataCfg
) -> tuple[np.ndarray, list[dict]]:
    """Compose one canvas.

    Args:
        rng: random generator (the only source of randomness).
        digits: (N, 8, 8) source digits in [0, 16] to choose from, with labels in `digits_labels`.
        cfg: data knobs.

    Returns:
        uint8 image (H, W, 3) and a list of {"index", "bbox"[x, y, w, h]} per pasted digit, where
        `index` is the row of `digits` that was pasted and bbox is tight around its visible ink.
    """
    size = cfg.canvas_size
    img = _background(rng, size)
    img = _clutter(rng, img, cfg.clutter)
    placed: list[dict] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(rng.integers(cfg.digits_per_image[0], cfg.digits_per_image[1] + 1)):
        idx = int(rng.integers(len(digits)))
        side = rng.uniform(*cfg.digit_size)
        aspect = rng.uniform(0.8, 1.25)
        w, h = max(4, int(side * min(1, aspect))), max(4, int(side / max(1, aspect)))
        for _attempt in range(30):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if not _overlaps((x, y, w, h), taken):
                break
        else:
            continue  # canvas full: skip this digit rather than overlap
        glyph = Image.fromarray((digits[idx] / 16.0 * 255).astype(np.uint8)).resize(
            (w, h), Image.BILINEAR
        )
        alpha = np.asarray(glyph, dtype=np.float32) / 255.0  # (h, w)
        ink = alpha > 0.25
        if not ink.any():
            continue
        colour = np.clip(
            img[y : y + h, x : x + w].mean((0, 1)) + rng.choice([-1, 1]) * rng.uniform(0.35, 0.7),
            0,
            1,
        )
        patch = img[y : y + h, x : x + w]
        img[y : y + h, x : x + w] = patch * (1 - alpha[..., None]) + colour * alpha[..., None]
        ys, xs = np.nonzero(ink)
        bx, by = x + int(xs.min()), y + int(ys.min())
        bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
        taken.append((x, y, w, h))
        placed.append({"index": idx, "bbox": [bx, by, bw, bh]})
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), placed


NOISE_KINDS = ("class_swap", "shift", "scale", "drop", "duplicate")


def _clip_box(x: float, y: float, w: float, h: float, size: int) -> list[float]:
    x0, y0 = min(max(x, 0.0), size - 1.0), min(max(y, 0.0), size - 1.0)
    x1, y1 = min(max(x + w, x0 + 1.0), float(size)), min(max(y + h, y0 + 1.0), float(size))
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def inject_noise(
    coco: dict, cfg: LabelNoiseCfg, rng: np.random.Generator, size: int, split: str
) -> list[dict]:
    """Corrupt `coco["annotations"]` in place; return the ground truth of what was injected.

    Exactly round(rate * boxes) boxes get each kind, and no box gets two. Records:
    {split, kind, image_id, annotation_id, original, noisy} where original / noisy are
    {category_id, bbox} (None for the side that does not exist: a dropped box has no noisy
    version, a duplicate no original; a duplicate's annotation_id is the copy's id).
    """
    anns = coco["annotations"]
    order = rng.permutation(len(anns))
    rates = [getattr(cfg, k) for k in NOISE_KINDS]
    counts = [int(round(r * len(anns))) for r in rates]
    truth: list[dict] = []
    next_id = max((a["id"] for a in anns), default=0) + 1
    dropped: set[int] = set()
    start = 0
    for kind, n in zip(NOISE_KINDS, counts, strict=True):
        for i in order[start : start + n]:
            a = anns[int(i)]
            before = {"category_id": a["category_id"], "bbox": list(a["bbox"])}
            x, y, w, h = a["bbox"]
            record = {"split": split, "kind": kind, "image_id": a["image_id"]}
            if kind == "class_swap":
                others = [c["id"] for c in coco["categories"] if c["id"] != a["category_id"]]
                a["category_id"] = int(rng.choice(others))
            elif kind == "shift":
                dx, dy = rng.uniform(0.25, 0.5, 2) * rng.choice([-1, 1], 2) * (w, h)
                a["bbox"] = _clip_box(x + dx, y + dy, w, h, size)
            elif kind == "scale":
                f = rng.uniform(0.5, 0.7) if rng.random() < 0.5 else rng.uniform(1.45, 2.0)
                a["bbox"] = _clip_box(x + w * (1 - f) / 2, y + h * (1 - f) / 2, w * f, h * f, size)
            elif kind == "drop":
                dropped.add(a["id"])
            else:  # duplicate: a second box on the same object, jittered by up to 1 px
                jx, jy = rng.integers(-1, 2, 2)
                copy = {**a, "id": next_id, "bbox": _clip_box(x + jx, y + jy, w, h, size)}
                next_id += 1
                anns.append(copy)
                truth.append(
                    {
                        **record,
                        "annotation_id": copy["id"],
                        "original": None,
                        "noisy": {"category_id": copy["category_id"], "bbox": copy["bbox"]},
                    }
                )
                continue
            after = None if kind == "drop" else {"category_id": a["category_id"], "bbox": a["bbox"]}
            a["area"] = a["bbox"][2] * a["bbox"][3]
            truth.append({**record, "annotation_id": a["id"], "original": before, "noisy": after})
        start += n
    coco["annotations"] = [a for a in anns if a["id"] not in dropped]
    return truth


def run(cfg: DataCfg, *, out_dir: Path) -> dict:
    """Build the default dataset into `out_dir` (atomically). Returns summary metrics."""
    from sklearn.datasets import load_digits

    source = load_digits()
    images, labels = source.images, source.target
    parts = split_sources(len(images), cfg.split_fractions, cfg.seed)
    counts = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
    metrics: dict = {}
    injected: list[dict] = []
    with atomic_dir(out_dir) as tmp:
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng([cfg.seed, s])
            pool = parts[split]
            (tmp / "images" / split).mkdir(parents=True)
            coco: dict = {"images": [], "annotations": [], "categories": CATEGORIES}
            for image_id in tqdm(
                range(1, counts[split] + 1), desc=f"data/{split}", leave=False, disable=None
            ):
                pixels, placed = compose_canvas(rng, images[pool], cfg)
                name = f"images/{split}/{image_id:05d}.png"
                Image.fromarray(pixels).save(tmp / name)
                coco["images"].append(
                    {
                        "id": image_id,
                        "file_name": name,
                        "width": cfg.canvas_size,
                        "height": cfg.canvas_size,
                    }
                )
                for p in placed:
                    src = int(pool[p["index"]])
                    x, y, w, h = p["bbox"]
                    coco["annotations"].append(
                        {
                            "id": len(coco["annotations"]) + 1,
                            "image_id": image_id,
                            "category_id": int(labels[src]) + 1,
                            "bbox": [x, y, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                            "source_index": src,  # sklearn row: proves splits are disjoint
                        }
                    )
            if split in cfg.noise.splits:
                noise_rng = np.random.default_rng([cfg.seed, s, 7])
                injected += inject_noise(coco, cfg.noise, noise_rng, cfg.canvas_size, split)
            write_json(tmp / f"{split}.json", coco)
            metrics[split] = {
                "images": len(coco["images"]),
                "annotations": len(coco["annotations"]),
                "source_digits": len(pool),
            }
        metrics["noise"] = {k: sum(r["kind"] == k for r in injected) for k in NOISE_KINDS}
        write_json(tmp / NOISE_FILE, {"config": cfg.noise.model_dump(), "injected": injected})
        write_json(tmp / "meta.json", meta(cfg, {}, ("scikit-learn", "pillow")))
    return metrics
