"""The project's data and checkpoints in Ultralytics' own formats.

`write_yolo_dataset` writes the project's manifest as the Ultralytics dataset layout (what its
exporter's calibration and its trainer read); `to_ultralytics_pt` turns a project checkpoint of
the `yolo` family (state_dict + model yaml) into an Ultralytics `.pt`. Used by Ultralytics'
reference export (tasks/models/ultralytics_ref.py), the variants row it feeds, and tests.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml

from tasks.datasets.coco import resolve_image
from tasks.harness.errors import DataError
from tasks.harness.io import write_text
from tasks.models.ultralytics_offline import offline_ultralytics
from tasks.preprocess.letterbox import input_wh

SPLITS = ("train", "val", "test")


# -- the dataset ------------------------------------------------------------------------------
def yolo_label_lines(coco: dict) -> dict[int, list[str]]:
    """{image id: label lines `class cx cy w h`} of a COCO split, normalised by each image's
    size; classes numbered in category-id order; crowd annotations left out (Ultralytics has
    no ignore regions); images without boxes get no lines (negatives)."""
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(cats)}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    lines: dict[int, list[str]] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        if a.get("iscrowd", 0):
            continue
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        lines[a["image_id"]].append(
            f"{index[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
            f"{bw / w:.6f} {bh / h:.6f}"
        )
    return lines


def write_yolo_dataset(
    manifest: dict, out: Path, splits: Iterable[str] = SPLITS, *, link: bool = True
) -> Path:
    """Write the project's manifest ({root, splits: {split: COCO}}) in the Ultralytics layout.

    `out/images/<split>/` holds each image (a symlink to the manifest's file, or a copy when
    `link` is False or the file system refuses links), `out/labels/<split>/<stem>.txt` its
    boxes (see `yolo_label_lines`), `out/data.yaml` the absolute path, the splits and `names`
    in category-id order. A file name is prefixed with its image id, so images of the same
    name in different folders stay apart. Returns the data.yaml path.

    Raises:
        DataError: an image path escapes the manifest's root, or a split is missing.
    """
    out = Path(out)
    root = Path(manifest["root"])
    splits = list(splits)
    names = None
    for split in splits:
        coco = manifest["splits"].get(split)
        if coco is None:
            raise DataError(
                f"manifest: splits.{split}: missing (found {sorted(manifest['splits'])})"
            )
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        names = names or [c["name"] for c in cats]
        images, labels = out / "images" / split, out / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        lines = yolo_label_lines(coco)
        for i, im in enumerate(coco["images"]):
            src = resolve_image(root, im["file_name"], root, f"splits.{split}.images[{i}]")
            dst = images / f"{im['id']}_{Path(im['file_name']).name}"
            dst.unlink(missing_ok=True)
            try:
                if not link:
                    raise OSError("copy asked for")
                dst.symlink_to(src)
            except OSError:
                shutil.copyfile(src, dst)
            write_text(labels / f"{dst.stem}.txt", "\n".join(lines[im["id"]]))
    spec = {"path": str(out.resolve()), **{s: f"images/{s}" for s in splits}, "names": names}
    if "val" not in spec:  # Ultralytics requires train and val keys
        spec["val"] = spec[splits[0]]
    write_text(out / "data.yaml", yaml.safe_dump(spec, sort_keys=False))
    return out / "data.yaml"


# -- a project checkpoint as an Ultralytics .pt -----------------------------------------------
def unsplit_c2f(state_dict: dict) -> dict:
    """The state dict of tasks.models.yolo's model (each C2f / C3k2 layer `k` rewritten as
    `C2fSplit`: `model.k.cv0` and `model.k.cv1` each make one half of the original `cv1`) as
    the state dict of Ultralytics' own DetectionModel: the two halves concatenated back into
    `model.k.cv1` (conv weight and BatchNorm rows; num_batches_tracked from `cv0`). A state
    dict without `cv0` layers (a plain DetectionModel's) comes back as it is."""
    import torch

    split = {key.split(".")[1] for key in state_dict if re.match(r"model\.\d+\.cv0\.", key)}
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "model" and parts[1] in split and parts[2] in ("cv0", "cv1"):
            if parts[2] == "cv1":
                continue  # merged with its cv0 half below
            rest = ".".join(parts[3:])
            second = state_dict[".".join(["model", parts[1], "cv1", rest])]
            merged = value if rest.endswith("num_batches_tracked") else torch.cat([value, second])
            out[".".join(["model", parts[1], "cv1", rest])] = merged
        else:
            out[key] = value
    return out


def to_ultralytics_pt(ckpt: dict, out: Path, source: Path | None = None) -> Path:
    """Write a project checkpoint of the `yolo` family as an Ultralytics `.pt` at `out`.

    The checkpoint (read with `torch.load(weights_only=True)`; tasks/models/yolo.py's
    `save`) holds `state_dict`, `categories` ([{id, name}], in class order) and `config.yaml`:
    the model yaml as a dict (Ultralytics' `DetectionModel.yaml`) or the name of a yaml shipped
    with Ultralytics. The model is rebuilt as Ultralytics' own DetectionModel (C2f layers as
    Ultralytics has them: `unsplit_c2f`), the weights loaded strictly, and saved the way
    Ultralytics' trainer saves (`{"model": module, "train_args": ...}`, a pickle Ultralytics
    loads itself). Only an unpruned model fits its yaml: the reference is Ultralytics' export
    of the trained model. `source` (the checkpoint's path) names the file in errors.

    Raises:
        DataError: the checkpoint is not of the `yolo` family, lacks a field, or its weights do
            not fit the model its yaml describes (e.g. a pruned checkpoint).
    """
    import torch

    offline_ultralytics()
    from ultralytics import __version__
    from ultralytics.nn.tasks import DetectionModel

    where = Path(source) if source else Path(out)
    config = ckpt.get("config") or {}
    if (
        ckpt.get("family") != "yolo"
        or "yaml" not in config
        or not {"state_dict", "categories"} <= set(ckpt)
    ):
        raise DataError(
            f"{where}: expected a yolo-family checkpoint with config.yaml, state_dict and "
            f"categories, found family {ckpt.get('family')!r} and keys {sorted(ckpt)}"
        )
    names = [c["name"] for c in ckpt["categories"]]
    model = DetectionModel(copy.deepcopy(config["yaml"]), nc=len(names), verbose=False)
    try:
        model.load_state_dict(unsplit_c2f(ckpt["state_dict"]), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(
            f"{where}: weights do not fit Ultralytics' model of its yaml (a pruned "
            f"checkpoint? the reference exports the trained, unpruned one): {first}"
        ) from e
    model.names = dict(enumerate(names))
    w, h = input_wh(config.get("input_size", 640))
    model.args = {"imgsz": w if w == h else [h, w], "task": "detect"}  # Ultralytics: [h, w]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    torch.save({"model": model.eval(), "train_args": model.args, "version": __version__}, tmp)
    os.replace(tmp, out)
    return out
