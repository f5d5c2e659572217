"""The registered model: an MLflow pyfunc whose `predict` runs the built engine (ONNX Runtime or
OpenVINO, `promote.target`) and returns detections.

Input: a DataFrame with one column `image` of encoded image files (PNG/JPEG bytes; over HTTP,
base64 in `dataframe_split`). Output: one row per detection, COCO-style, in the image's own
pixels: `image` (row of the input), `category_id`, `category`, `score`, `x`, `y`, `width`,
`height`. Param `score_threshold` (default: export.score_floor, i.e. every detection the engine
returns, as evaluate scores them). Preprocessing and box scaling are the evaluate stage's own code
(`tasks.datasets.coco.to_input`, `tasks.metrics.detection.to_rows`), so the served detections are
evaluate's.

The model folder holds `model.onnx` (the deployable ONNX), `engines/<target>/` (every engine built
with status ok), `detector.json` (target, input size, categories, engine settings) and
`model_card.md`; the `tasks` package travels with it (`code_paths`), so `mlflow models serve
--env-manager local -m models:/<name>@champion` needs only the libraries listed in its
requirements. It is saved as *models from code* (`served_model.py`): no pickle in the folder.
`load_files` rebuilds a registered version's detector from its engine files and `detector.json`
alone, with this checkout's code (what `promote` does with the champion): nothing the registry
holds is executed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from tasks.harness.errors import ShrinkflowError
from tasks.harness.io import versions

COLUMNS = {
    "image": "int64",
    "category_id": "int64",
    "category": "object",
    "score": "float64",
    "x": "float64",
    "y": "float64",
    "width": "float64",
    "height": "float64",
}
PACKAGES = ("mlflow", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "onnx", "pycocotools")
RUNTIME_PACKAGES = {
    "onnxruntime": ("onnxruntime",),
    "openvino": ("openvino",),
    "litert": ("ai-edge-litert", "onnxruntime"),  # the .tflite head; its decode runs in ORT
}
BATCH = 32  # images per engine call


def decode(data: bytes) -> np.ndarray:
    """An encoded image file as uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def detect(runner, images: list[np.ndarray], spec: dict, score_threshold: float) -> pd.DataFrame:
    """Run `runner` on decoded images; detections in each image's pixels as a DataFrame."""
    from tasks.datasets.coco import to_input
    from tasks.metrics.detection import to_rows

    names = {c["id"]: c["name"] for c in spec["categories"]}
    rows: list[dict] = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        inputs = [to_input(im, spec["input_size"]) for im in chunk]
        x = np.stack([p for p, _ in inputs]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        ids = list(range(start, start + len(chunk)))
        rows += to_rows(runner(x), ids, [s for _, s in inputs], spec["category_ids"])
    frame = pd.DataFrame(
        [
            {
                "image": r["image_id"],
                "category_id": r["category_id"],
                "category": names[r["category_id"]],
                "score": r["score"],
                "x": r["bbox"][0],
                "y": r["bbox"][1],
                "width": r["bbox"][2],
                "height": r["bbox"][3],
            }
            for r in rows
            if r["score"] >= score_threshold
        ],
        columns=list(COLUMNS),
    )
    return frame.astype(COLUMNS)


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Loads the engine of `detector.json`'s target; `predict` returns detections."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts["detector"]).read_text())
        self.load(spec, Path(context.artifacts["engines"]))

    def load(self, spec: dict, engines: Path) -> DetectorModel:
        """Load the engine of `spec["target"]` from `engines/<target>/`."""
        from tasks.engines import get
        from tasks.harness.config import BuildEngineCfg

        self.spec = spec
        cfg = BuildEngineCfg(**spec["build_engine"])
        self.runner = get(spec["target"]).load(engines / spec["target"], cfg)
        return self

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        threshold = float((params or {}).get("score_threshold", self.spec["score_floor"]))
        images = [decode(bytes(b)) for b in model_input["image"]]
        return detect(self.runner, images, self.spec, threshold)


def save(
    path: Path,
    *,
    onnx_path: Path,
    engines: Path,
    spec: dict,
    card: Path,
    example_image: bytes,
) -> None:
    """Write the pyfunc model folder at `path` (no server involved): artifacts, signature,
    input example, requirements and the `tasks` code."""
    import tasks

    example = pd.DataFrame({"image": [example_image]})
    spec_file = path.parent / "detector.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    output = DetectorModel().load(spec, engines).predict(None, example)
    signature = mlflow.models.infer_signature(
        example, output, params={"score_threshold": float(spec["score_floor"])}
    )
    pins = versions(*PACKAGES, *RUNTIME_PACKAGES.get(spec["target"], ()))
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("served_model.py")),  # models from code
        artifacts={
            "onnx": str(onnx_path),
            "engines": str(engines),
            "detector": str(spec_file),
            "card": str(card),
        },
        code_paths=[str(Path(tasks.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=[f"{p}=={v}" for p, v in pins.items() if v != "not installed"],
    )


def _relative(path: str, what: str) -> str:
    """A path inside the model folder, as the version's MLmodel names it (never `..`/absolute)."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ShrinkflowError(f"{what}: path {path!r} leaves the model folder")
    return p.as_posix()


def load_files(source: str, dst: Path, *, tracking_uri: str, what: str) -> DetectorModel:
    """The detector of a registered version (`source`: its model folder's artifact URI) built
    from its files alone: MLmodel (YAML, read safely) names the artifacts; `detector.json` and
    `engines/<target>/` are downloaded into `dst` and loaded with this checkout's engine code.
    The version's code and any pickle in it are never loaded. `what` names it in errors."""

    from tasks.engines import get

    def fetch(rel: str) -> Path:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/{rel}", dst_path=str(dst), tracking_uri=tracking_uri
        )
        return Path(local)

    try:
        conf = yaml.safe_load(fetch("MLmodel").read_text())
        arts = conf["flavors"]["python_function"]["artifacts"]
        spec = json.loads(fetch(_relative(arts["detector"]["path"], what)).read_text())
        target = str(spec["target"])
        get(target)  # one of this checkout's engine targets, or a clear error
        engines = _relative(arts["engines"]["path"], what)
        engine_dir = fetch(f"{engines}/{_relative(target, what)}")  # lands in dst/<target>
        return DetectorModel().load(spec, engine_dir.parent)
    except ShrinkflowError:
        raise
    except (MlflowException, KeyError, TypeError, ValueError, OSError, yaml.YAMLError) as e:
        raise ShrinkflowError(f"{what}: cannot load its engine files: {e!r}") from e
