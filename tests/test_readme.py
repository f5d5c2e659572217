"""The README's measured tables are the files in artifacts/ (tasks/cli/measured.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tasks.cli import measured
from tasks.harness.project import ROOT


def test_the_readme_tables_are_what_artifacts_hold():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [m[1] for m in measured.MARK.findall(readme)]
    assert sorted(names) == sorted(measured.TABLES), "every table is in the README, once"
    assert measured.render(readme, ROOT) == readme, "README is stale: run `shrinkflow readme`"


def _root_with(tmp_path, rel):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path / rel


def test_a_changed_figure_changes_its_table_and_the_check_fails(tmp_path):
    path = _root_with(tmp_path, "artifacts/variants/metrics.json")
    block = "<!-- measured:variants -->\n<!-- /measured:variants -->\n"
    first = measured.render(block, tmp_path)
    rows = json.loads(path.read_text())
    rows["deployed"]["map50"] = 0.12345
    path.write_text(json.dumps(rows))
    second = measured.render(first, tmp_path)
    assert "| deployed | onnxruntime | 0.1235 |" in second and second != first
    readme = tmp_path / "README.md"
    readme.write_text(first)
    check = subprocess.run(
        [sys.executable, "-m", "tasks.cli.app", "readme", "--check", "--readme", str(readme)],
        capture_output=True,
        text=True,
    )
    said = " ".join((check.stdout + check.stderr).split())
    assert check.returncode == 1 and "measured tables differ from" in said, said


def test_a_benchmark_file_of_an_older_model_is_marked_stale(tmp_path):
    _root_with(tmp_path, "artifacts/evaluate/onnxruntime/metrics.json")
    current = json.loads((ROOT / "artifacts/evaluate/onnxruntime/metrics.json").read_text())
    bench = tmp_path / "artifacts/bench/pipeline-default.json"
    bench.parent.mkdir(parents=True, exist_ok=True)
    run = {"dvc_repro_cold_s": 500.0, "dvc_repro_noop_s": 1.0, "machine": {"cpus": 2}}
    bench.write_text(json.dumps({**run, "kpis": {"evaluate/onnxruntime": {"map50": 0.5}}}))
    assert "Stale" in measured.pipeline_time(tmp_path)
    same = {"evaluate/onnxruntime": {"map50": current["map50"]}}
    bench.write_text(json.dumps({**run, "kpis": same, "stage_s": {"train": 120.4}}))
    text = measured.pipeline_time(tmp_path)
    assert "Stale" not in text and "| train | 120 |" in text and "**500 s**" in text


def test_a_missing_file_names_the_command_that_writes_it(tmp_path):
    assert "`shrinkflow bench`" in measured.engines(tmp_path)
    with pytest.raises(KeyError, match="measured:nope"):
        measured.render("<!-- measured:nope -->\nx\n<!-- /measured:nope -->", tmp_path)
