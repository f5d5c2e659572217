"""Shrinkflow stages. Each module `tasks/<stage>.py` holds one stage: a typed `run(...)` core and
a thin `python -m tasks.<stage>` entry point that `dvc.yaml` calls."""
