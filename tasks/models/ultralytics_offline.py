"""Ultralytics, imported offline: no downloads (weights, fonts), no pip auto-installs, no
telemetry, no integrations (MLflow, DVC, W&B, ...), and the user's settings file untouched.
Every project module reaches Ultralytics through `offline_ultralytics()`."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType

from tasks.harness.io import copy_file

log = logging.getLogger(__name__)

# Ultralytics' switches, set (unless the user set them) before it is first imported
ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false"}
CONFIG_DIR_ENV = "YOLO_CONFIG_DIR"
# settings that would send data out or log runs elsewhere (MLflow, DVC, W&B, ...)
SETTINGS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
FONTS = ("Arial.ttf", "Arial.Unicode.ttf")  # what Ultralytics' check_font looks for


def private_config_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"shrinkflow-ultralytics-{os.getuid()}"


def _register_fonts() -> None:
    """Give Ultralytics' `check_font` the fonts it looks for, so that it never downloads them:
    matplotlib's DejaVu Sans copied as `Arial.ttf` / `Arial.Unicode.ttf` into the private
    folder and added to matplotlib's font list in memory (where `check_font` looks after its
    settings folder), whatever settings folder Ultralytics was imported with."""
    import matplotlib
    from matplotlib import font_manager

    known = {Path(f.fname).name for f in font_manager.fontManager.ttflist}
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in FONTS:
        if name in known:
            continue
        path = private_config_dir() / "fonts" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            copy_file(font, path)
        font_manager.fontManager.addfont(str(path))


def offline_env() -> None:
    """Set Ultralytics' switches where the user has not: they must precede its first import
    (modules that may import Ultralytics call this when they are imported)."""
    import sys

    if "ultralytics" not in sys.modules:
        for key, value in {**ENV, CONFIG_DIR_ENV: str(private_config_dir())}.items():
            os.environ.setdefault(key, value)


def offline_ultralytics() -> ModuleType:
    """Import Ultralytics with downloads, auto-installs, telemetry and integrations off.

    Environment switches are set only where the user has not set them; they take effect only
    if Ultralytics is not yet imported in this process (its online check runs at import), so
    every project module reaches Ultralytics through this function.
    """
    offline_env()
    import ultralytics
    from ultralytics.utils import ONLINE, SETTINGS

    if ONLINE:
        log.warning("Ultralytics was imported before offline_ultralytics(): it may go online")
    # dict.update, not SETTINGS.update: the latter rewrites the settings file on disk
    dict.update(SETTINGS, dict.fromkeys(SETTINGS_OFF, False))
    _register_fonts()
    return ultralytics
