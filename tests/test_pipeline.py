"""End to end: the whole DAG on the tiny profile, run once by the nightly Prefect deployment on a
real process worker (tests/deployment.py's `dag`), in a temp copy of the project, tracked by its
own real MLflow server; then `dvc repro` on copies of that project.

The data is a user's own: the tiny profile's digits, written in the Ultralytics layout under the
project's `data/yolo` and read with `dataset.format: yolo` (a params change, no dvc.yaml edit), so
every stage through promote runs on YOLO-format input. The builtin source runs in the default
`dvc repro`, in tests/test_flows.py's small projects and in tests/test_ingest.py.
"""

import json
import re

import pytest
import yaml
from dvc.repo import Repo
from mlflow.tracking import MlflowClient

from flows.project import read_dag
from tasks.datasets.coco import DetectionSet
from tasks.harness.project import dvc
from tasks.models import load_checkpoint
from tasks.models.training import evaluate_model
from tasks.models.ultralytics_io import SPLITS
from tests.conftest import tiny_params
from tests.deployment import STAGES, TARGETS, YOLO, copy_of, states_by_task

pytestmark = [pytest.mark.slow, pytest.mark.server]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def changed_stages(proj) -> set[str]:
    """The stages `dvc status` says have changed (their deps, outs or params)."""
    status = dvc(proj, "status", "--json")
    assert status.returncode == 0, status.stderr
    return set(json.loads(status.stdout or "{}"))


def test_every_stage_ran_in_dag_order_and_every_declared_output_exists(dag, prefect_server):
    api, _ = prefect_server
    tasks = states_by_task(api, dag.run.id)
    stages = {n: t for n, t in tasks.items() if not n.startswith("dvc-command")}
    assert sorted(stages) == sorted(STAGES)
    # a fresh project: every stage ran (none was up to date or restored from DVC's run cache)
    assert {n: t.state.name for n, t in stages.items()} == dict.fromkeys(stages, "Completed")
    order = sorted(stages, key=lambda n: stages[n].start_time)
    for t in TARGETS:
        assert (
            order.index(f"build_engine@{t}") < order.index(f"evaluate@{t}") < order.index("compare")
        )
    for dep, stage in read_dag(dag.proj).edges():  # one at a time: a stage starts after its deps
        assert stages[dep].end_time <= stages[stage].start_time, (dep, stage)
    with Repo(str(dag.proj)) as repo:
        declared = [o for s in repo.index.stages for o in s.outs]
    assert len(declared) >= 20
    missing = [str(o) for o in declared if not o.exists]
    assert not missing


def test_ingest_read_the_yolo_folder(dag):
    proj = dag.proj
    metrics = json.loads((proj / "artifacts/ingest/metrics.json").read_text())
    tiny = tiny_params()["data"]
    counts = [tiny["train_images"], tiny["val_images"], tiny["test_images"]]
    assert metrics["format"] == "yolo"
    assert [metrics[s]["images"] for s in SPLITS] == counts
    assert metrics["files"] >= sum(counts)  # each image (and its label file)
    assert not list((proj / "artifacts/ingest/builtin").iterdir())  # no builtin data composed
    manifest = json.loads((proj / "artifacts/ingest/manifest.json").read_text())
    assert (proj / manifest["root"]).resolve() == (proj / YOLO).resolve()


def test_kpis_are_in_range_and_beat_an_untrained_model(dag):
    proj = dag.proj
    m = json.loads((proj / "artifacts/evaluate/onnxruntime/metrics.json").read_text())
    for k in ("map50", "map50_95", "precision", "recall"):
        assert 0 <= m[k] <= 1, k
    assert m["map50_95"] <= m["map50"]
    assert m["latency_ms_p95"] >= m["latency_ms_p50"] > 0
    assert m["size_mb"] > 0 and m["params"] > 0 and m["macs"] > 0
    assert m["delta_map50"] == pytest.approx(m["map50"] - m["baseline"]["map50"])
    assert m["macs"] < m["baseline"]["macs"]  # the deployed model is the pruned one
    ref = json.loads((proj / "artifacts/reference/metrics.json").read_text())
    assert m["baseline"]["macs"] == m["fp32_same_runtime"]["macs"] == ref["macs"]
    assert ref["parity_max_abs_diff"] <= tiny_params()["export"]["parity_tolerance"]
    manifest = json.loads((proj / "artifacts/label_qa/manifest.json").read_text())
    manifest["root"] = str(proj / manifest["root"])
    adapter, _, ckpt = load_checkpoint(proj / "artifacts/train/model.pt")
    untrained = adapter.build(len(ckpt["categories"]), ckpt["config"]["input_size"], 0).eval()
    test = DetectionSet(manifest, "test", ckpt["config"]["input_size"])
    chance = evaluate_model(adapter, untrained, test)["map50"]
    assert m["map50"] > chance + 0.3, (m["map50"], chance)


def test_variants_table_covers_every_step_of_the_recipe(dag):
    proj = dag.proj
    table = json.loads((proj / "artifacts/variants/metrics.json").read_text())
    calibrators = [f"int8_{c}" for c in ("minmax", "entropy", "percentile")]
    from tasks.engines.litert import unavailable

    litert = [] if unavailable() else ["litert"]  # quantize's full-integer model, where built
    assert list(table) == [
        "trained",
        "pruned",
        "distilled",
        *calibrators,
        "deployed",
        "fp16",
        "bf16",
        "deployed_openvino",
        *litert,
        "nncf_ptq",  # what NNCF gives without Shrinkflow (tasks/quantization/nncf_peers.py)
        "nncf_accuracy_control",
    ]
    from tasks.quantization.nncf_peers import unavailable as no_nncf

    for name, r in table.items():
        if name.startswith("nncf_") and no_nncf():
            assert r["status"] == "skipped: nncf not installed", name
            continue
        assert 0 <= r["map50_95"] <= r["map50"] <= 1, name
        assert r["latency_ms_p50"] > 0 and r["size_mb"] > 0, name
    assert table["pruned"]["macs"] < table["trained"]["macs"]
    assert table["int8_minmax"]["size_mb"] < 0.5 * table["distilled"]["size_mb"]
    assert table["bf16"]["runtime"] == "openvino (bf16 hint)"
    assert table["deployed"]["precision"] in ("int8", "fp16", "fp32")
    if not no_nncf():
        assert table["nncf_ptq"]["runtime"] == "openvino (NNCF)"
        assert table["nncf_ptq"]["nncf"]["convs_int8"] == table["nncf_ptq"]["nncf"]["convs"]
        assert table["nncf_accuracy_control"]["nncf"]["drop_met"] in (True, False)
        # ours against the peer, paired over the same test images
        for ours in ("deployed", "deployed_openvino", *litert):
            v = table[ours]["vs_peer"]["nncf_accuracy_control"]
            diff = table[ours]["map50"] - table["nncf_accuracy_control"]["map50"]
            assert v["map50_diff"] == pytest.approx(diff, abs=0.02), ours  # pycocotools vs fast
            assert v["ci_low"] <= v["map50_diff"] <= v["ci_high"], (ours, v)
            lo, hi = v["ci_low"], v["ci_high"]
            want = "better" if lo > 0 else "worse" if hi < 0 else "equal within noise"
            assert v["verdict"] == want, (ours, v)
            ratio = table["nncf_accuracy_control"]["latency_ms_p50"] / table[ours]["latency_ms_p50"]
            assert v["speedup"] == pytest.approx(ratio)
    # the calibrator rows are the models quantize made (work done once), not made again
    from tasks.variants import calibrator_models

    qdir = proj / "artifacts/quantize"
    report = json.loads((qdir / "report.json").read_text())
    made = calibrator_models(report, qdir, None, None, None, proj)  # nothing to make
    assert made == {c: qdir / "calibrators" / f"{c}.onnx" for c in calibrators}
    assert all(f.exists() for f in made.values())


def test_targets_are_built_evaluated_and_compared(dag):
    proj = dag.proj
    table = json.loads((proj / "artifacts/compare/engines.json").read_text())
    assert set(table) == set(TARGETS)
    for t in ("onnxruntime", "openvino"):
        assert table[t]["status"] == "ok" and 0 < table[t]["map50"] <= 1
        m = json.loads((proj / f"artifacts/evaluate/{t}/metrics.json").read_text())
        assert 0 < m["parity"]["match_rate"] <= 1
        assert ("latency_ms_p99" in m) == (m["latency_runs"] >= 200)  # the tiny profile: 10
    trt = json.loads((proj / "artifacts/build_engine/tensorrt/metrics.json").read_text())
    assert trt["status"].startswith("skipped: ") or trt["status"] == "ok"
    assert table["tensorrt"]["status"] == trt["status"]
    # LiteRT: built from the full-integer model quantize made for it, where the extra is installed
    lite = json.loads((proj / "artifacts/build_engine/litert/metrics.json").read_text())
    assert lite["status"] == "ok" or lite["status"].startswith("skipped: ")
    if lite["status"] == "ok":
        assert lite["source"] == "model.tflite" and lite["delegate"] == "XNNPACK"
        assert table["litert"]["status"] == "ok" and 0 < table["litert"]["map50"] <= 1


def test_metrics_and_plots_render(dag):
    proj = dag.proj
    shown = dvc(proj, "metrics", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "map50" in shown.stdout and "latency_ms_p50" in shown.stdout
    plots = dvc(proj, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    assert "pr_curve.csv" in plots.stdout and "curves.csv" in plots.stdout


def test_mlflow_has_a_parent_run_with_a_child_per_stage(dag):
    client = MlflowClient(dag.mlflow)
    exp = client.get_experiment_by_name(tiny_params()["project"]["mlflow_experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.`shrinkflow.role` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["shrinkflow.execution_id"] == str(dag.run.id)  # the flow run's id
    for tag in ("git_commit", "dvc_lock_md5", "data_md5", "params_md5"):
        assert len(parent.data.tags[tag]) >= 32, tag
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {r.info.run_name: r for r in children}
    # check_params only validates params.yaml: it tracks nothing
    assert sorted(by_stage) == sorted(set(STAGES) - {"check_params"})
    assert all(r.info.status == "FINISHED" for r in children)
    train = by_stage["train"]
    assert train.data.params["epochs"] == str(tiny_params()["train"]["epochs"])
    curve = client.get_metric_history(train.info.run_id, "val_map50")
    assert len(curve) == tiny_params()["train"]["epochs"]
    evaluation = by_stage["evaluate@onnxruntime"]
    assert 0 < evaluation.data.metrics["map50"] <= 1
    assert "baseline.latency_ms_p50" in evaluation.data.metrics
    exported = [f.path for f in client.list_artifacts(by_stage["export"].info.run_id, "model")]
    assert exported == ["model/model.onnx"]
    reference = [f.path for f in client.list_artifacts(by_stage["reference"].info.run_id, "model")]
    assert reference == ["model/model.onnx"]
    reports = [f.path for f in client.list_artifacts(evaluation.info.run_id, "evaluation")]
    assert "evaluation/report.md" in reports


def test_promote_registers_the_candidate_with_its_verdict(dag):
    proj = dag.proj
    decision = json.loads((proj / "artifacts/promote/decision.json").read_text())
    name = tiny_params()["project"]["registered_model"]
    assert decision["registered_model"] == name and decision["version"] == 1
    assert decision["outcome"] == ("champion" if decision["passed"] else "challenger")
    assert set(decision["gates"]) >= {"absolute.map50", "per_class", "non_regression"}
    client = MlflowClient(dag.mlflow)
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    mv = client.get_model_version(name, "1")
    assert mv.tags["gate"] == ("passed" if decision["passed"] else "failed")
    assert mv.tags["map50"] and len(mv.tags["calibration_md5"]) == 32
    assert client.get_model_version_by_alias(name, "challenger").version == "1"
    shown = dvc(proj, "metrics", "show", "--json")
    assert "promote/decision.json" in shown.stdout


def test_repro_of_the_flow_output_is_a_no_op_then_reruns_only_what_a_param_change_touches(
    dag, mlflow_server, tmp_path
):
    """The flow wrote what `dvc repro` expects (dvc.lock, outputs, cache): nothing to run. A
    param only promote reads then re-runs promote (and check_params, which reads every param).
    On a copy (the session's MLflow server: promote registers again there, not in the DAG's)."""
    proj = copy_of(dag.proj, tmp_path / "proj")
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    again = dvc(proj, "repro", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert ran(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["promote"]["lock_timeout_s"] += 1  # read by promote only (CI time: no evaluate)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(proj) == {"check_params", "promote"}
    changed = dvc(proj, "repro", env=env)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert sorted(ran(changed.stdout)) == ["check_params", "promote"]


def test_a_changed_label_reruns_ingest_and_what_reads_it_and_nothing_before(
    dag, mlflow_server, tmp_path
):
    """One YOLO label file edited (in a copy of the flow's project): ingest is the only stage
    whose deps changed; re-run up to label_qa (CI time: no training), the manifests change and
    DVC then holds train, and nothing before ingest, for changed."""
    proj = copy_of(dag.proj, tmp_path / "proj")
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    assert changed_stages(proj) == set()
    before = json.loads((proj / "artifacts/ingest/metrics.json").read_text())
    label = sorted((proj / YOLO / "labels/train").glob("*.txt"))[0]
    cls, rest = label.read_text().split(" ", 1)
    label.write_text(f"{(int(cls) + 1) % 10} {rest}")
    assert changed_stages(proj) == {"ingest"}
    rerun = dvc(proj, "repro", "label_qa", env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert ran(rerun.stdout) == ["ingest", "label_qa"]
    after = json.loads((proj / "artifacts/ingest/metrics.json").read_text())
    assert after["content_md5"] != before["content_md5"]
    assert after["files"] == before["files"]
    waiting = changed_stages(proj)
    assert "train" in waiting
    assert not waiting & {"check_params", "ingest", "label_qa"}
