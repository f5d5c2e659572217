"""A Shrinkflow project on disk: its pipeline files, profiles, and fresh copies of it.

Used by the pipeline benchmark and the end-to-end tests, which both need a clean repository
(no DVC cache, no MLflow store) to measure or test a run from scratch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {
    "default": None,
    "tiny": ROOT / "tests" / "profiles" / "tiny.yaml",
    "yolo": ROOT / "tests" / "profiles" / "yolo.yaml",  # the default data, YOLOv8n from yaml
}
PIPELINE_FILES = (
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvcignore",
    ".dvc/config",
    ".gitignore",
    "data/README.md",
    "data/models/README.md",  # model.path: the folder of a user's model files (a dvc dep)
    "tasks",
    "flows",
    "prefect.yaml",
    "label_qa/decisions.yaml",  # the reviewer's decisions: a dep of the label_qa stage
)


def profile_params(profile: str) -> dict:
    """params.yaml with the profile's overlay merged section by section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overlay = PROFILES[profile]
    if overlay is not None:
        for section, values in yaml.safe_load(overlay.read_text()).items():
            params[section].update(values)
    return params


def copy_project(dest: Path, params: dict) -> Path:
    """Copy the pipeline files into `dest`, write `params`, and commit them to a new git repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@shrinkflow", "-c", "user.name=shrinkflow"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "project copy"], cwd=dest, check=True)
    return dest


def venv_env(**extra: str) -> dict:
    """The environment with this interpreter's bin first: stage commands say `python`."""
    bin_dir = str(Path(sys.executable).parent)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path, **extra}


def dvc(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the DVC that sits beside this interpreter; capture its output."""
    exe = Path(sys.executable).with_name("dvc")
    return subprocess.run(
        [str(exe), *args],
        cwd=cwd,
        env=venv_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=3600,
    )
