"""Stage `check_params`: validate the whole params.yaml, once per `dvc repro`.

Every other stage validates params.yaml too, but only when DVC decides it must run: a misspelt
top-level section (`trian:`) or an unsafe path changes no stage's declared params, so `dvc repro`
would call the pipeline "up to date". This stage depends on the whole file (`params.yaml:` in
dvc.yaml), so any edit re-runs it, and it comes first so a bad value fails the run before any
stage command interpolates it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from tasks.harness.config import load_params
from tasks.harness.errors import ShrinkflowError
from tasks.harness.stage import STAGE_SECTIONS, fail, setup_logging

app = typer.Typer(add_completion=False)


@app.command()
def main(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Exit 2 with `params.yaml: <key>: <problem>` unless every section and key is valid."""
    setup_logging()
    every = tuple(dict.fromkeys(s for sections in STAGE_SECTIONS.values() for s in sections))
    try:
        load_params(params, every)
    except ShrinkflowError as e:
        fail(e)


if __name__ == "__main__":
    app()
