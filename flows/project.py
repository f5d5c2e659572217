"""What the flows need from a DVC project: its DAG, and DVC commands run in it.

The DAG comes from DVC itself (`dvc.repo.Repo(root).index.graph`, an internal API: DVC is pinned
in pyproject.toml), so a stage added to `dvc.yaml` is in the flow with no code change.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from tasks.harness.io import write_text
from tasks.harness.project import venv_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dag:
    """The pipeline stages in a runnable order and, for each, the stages it depends on."""

    stages: list[str]
    upstream: dict[str, list[str]]

    def edges(self) -> set[tuple[str, str]]:
        """(dependency, dependent) pairs."""
        return {(u, s) for s, ups in self.upstream.items() for u in ups}


def read_dag(root: Path) -> Dag:
    """Read the pipeline DAG of the DVC project at `root`.

    Stages are ordered topologically; ties keep their `dvc.yaml` order. Names are DVC's
    addressing (`build_engine@onnxruntime` for a foreach item), valid `dvc repro` targets.
    Data tracked by `.dvc` files is not a stage and is left out.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stage it depends on
        declared = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        name = {s: _address(s, Path(repo.root_dir)) for s in declared}
        rank = {name[s]: i for i, s in enumerate(declared)}
        pipeline = graph.subgraph([s for s in graph.nodes if isinstance(s, PipelineStage)])
        order = nx.lexicographical_topological_sort(
            pipeline.reverse(copy=True), key=lambda s: rank[name[s]]
        )
        stages = [name[s] for s in order]
        upstream = {
            name[s]: sorted((name[d] for d in pipeline.successors(s)), key=rank.__getitem__)
            for s in pipeline.nodes
        }
    return Dag(stages, upstream)


def _address(stage, root: Path) -> str:
    # DVC's `stage.addressing` is relative to the current directory; we run DVC in `root`
    dvcfile = Path(stage.path).relative_to(root)
    return (
        stage.name
        if dvcfile.name == "dvc.yaml" and dvcfile.parent == Path()
        else (f"{dvcfile}:{stage.name}")
    )


class Outcome(StrEnum):
    """What `dvc repro --single-item <stage>` did."""

    RAN = "ran"
    CACHED = "cached"  # up to date, or restored from DVC's run cache without running


def outcome(stage: str, output: str) -> Outcome:
    """Classify a `dvc repro --single-item` log (DVC's own wording, pinned with DVC)."""
    name = re.escape(stage)
    if re.search(rf"Running stage '{name}'", output):
        return Outcome.RAN
    if re.search(rf"Stage '{name}' (didn't change|is cached)", output):
        return Outcome.CACHED
    raise ValueError(f"cannot tell from DVC's output what happened to stage {stage!r}:\n{output}")


@dataclass(frozen=True)
class DvcResult:
    returncode: int
    output: str  # stdout and stderr, interleaved as printed
    timed_out: bool

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def run_dvc(
    root: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> DvcResult:
    """Run `dvc <args>` in `root` (the DVC beside this interpreter), streaming its output.

    Each output line goes to `on_line` as it is printed. On timeout the whole process group
    (DVC and the stage command it started) is killed.
    """
    exe = str(Path(sys.executable).with_name("dvc"))
    # a wide console: the stages log through rich, which wraps at 80 columns when not on a tty
    proc = subprocess.Popen(
        [exe, *args],
        cwd=root,
        env=venv_env(COLUMNS="160", **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: collections.deque[str] = collections.deque(maxlen=2000)

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    return DvcResult(proc.returncode, "".join(lines), timed_out)


def apply_overrides(root: Path, overrides: list[str], check: Callable[[Path], object]) -> None:
    """Apply `key=value` overrides to `root/params.yaml` as `dvc exp run -S` does (DVC's Hydra
    override syntax: `train.epochs=2`, `+new.key=1`, `~drop.key`).

    The result is first written to a scratch `params.yaml` and passed to `check` (which raises
    on invalid params), so a bad override leaves the project's file as it was.
    """
    from dvc.utils.hydra import apply_overrides as dvc_apply

    if not overrides:
        return
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "params.yaml"
        shutil.copyfile(root / "params.yaml", scratch)
        dvc_apply(scratch, list(overrides))
        check(scratch)
        write_text(root / "params.yaml", scratch.read_text())
