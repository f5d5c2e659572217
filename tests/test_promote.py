"""The promote stage against a real MLflow server: gates, champion/challenger aliases with a
compare-and-set, the paired bootstrap vs the champion, the served pyfunc, the review CLI, and a
server that is down. Candidates are built from a briefly trained model (real ONNX, real engines);
the evaluate metrics that feed the KPI gates are written by the tests."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from tasks import build_engine, train
from tasks.datasets.coco import DetectionSet
from tasks.engines import get
from tasks.harness.config import Params, load_params
from tasks.harness.errors import ConfigError
from tasks.harness.project import venv_env
from tasks.harness.tracking import ensure_experiment
from tasks.metrics import bootstrap
from tasks.metrics.detection import coco_metrics, predict
from tasks.models.onnx_export import to_onnx
from tasks.promote import candidate, stage
from tasks.promote.ledger import AliasLedger, ChampionMoved
from tasks.promote.numeric import numeric_format
from tests.conftest import free_port, tiny_params

KPIS = {
    "map50": 0.95,
    "map50_95": 0.7,
    "precision": 0.8,
    "recall": 0.9,
    "latency_ms_p50": 0.5,
    "latency_ms_p95": 0.6,
    "latency_ms_p99": 0.7,
    "throughput_ips": 2000.0,
    "size_mb": 0.2,
    "params": 1000,
    "macs": 10**6,
}


def test_without_p99_compare_leaves_it_blank_and_a_p99_gate_says_why(tmp_path):
    """Evaluate reports no p99 from fewer than 200 timed calls: compare's row has none and a
    promote gate on it is a config error naming the count, not a KeyError or a guess."""
    from tasks import compare
    from tasks.harness.config import AbsoluteGate
    from tasks.promote.gates import Evidence, absolute

    metrics = {k: v for k, v in KPIS.items() if k != "latency_ms_p99"}
    metrics |= {"status": "ok", "latency_runs": 60, "parity": {"match_rate": 0.99}}
    metrics |= {"speedup_vs_fp32_same_runtime": 1.5, "speedup_vs_eager": 20.0}
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "metrics.json").write_text(json.dumps(metrics))
    rows, table, _ = compare.run(["onnxruntime"], tmp_path)
    assert "latency_ms_p99" not in rows[0] and rows[0]["latency_ms_p95"] == 0.6
    head, _, row = table.strip().splitlines()[-3:]
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["latency_ms_p99"] == "" and cells["latency_ms_p95"] == "0.6"
    p99 = AbsoluteGate(kind="absolute", kpi="latency_ms_p99", op="<=", value=2.0)
    with pytest.raises(ConfigError, match=r"latency_ms_p99 is not in .*timed 60 calls.*>= 200"):
        absolute(p99, Evidence(metrics), "p99")
    p95 = AbsoluteGate(kind="absolute", kpi="latency_ms_p95", op="<=", value=2.0)
    assert absolute(p95, Evidence(metrics), "p95").passed


# ---------------------------------------------------------------- fixtures: real models


@pytest.fixture(scope="module")
def onnx_models(tiny, adapter, tiny_manifest, tmp_path_factory):
    """good.onnx: a briefly trained detector; good2/good3/weak.onnx: the same graph with other
    metadata (different files, hence other candidates, with the same detections); shrunk.onnx:
    the same predicting boxes half as wide and high (IoU 0.25 with what good.onnx finds: a
    real, large regression)."""
    tmp = tmp_path_factory.mktemp("promote-models")
    size = tiny.train.input_size
    model, _ = train.run(
        adapter,
        tiny.train.model_copy(update={"epochs": 6}),
        train=DetectionSet(tiny_manifest, "train", size),
        val=DetectionSet(tiny_manifest, "val", size),
    )
    to_onnx(adapter, model, tiny.export, tmp / "good.onnx")
    for other in ("good2", "good3", "weak"):
        again = onnx.load(str(tmp / "good.onnx"))
        onnx.helper.set_model_props(again, {"candidate": other})
        onnx.save(again, str(tmp / f"{other}.onnx"))
    shrunk = copy.deepcopy(model)
    wh = slice(shrunk.cfg.num_classes, shrunk.cfg.num_classes + 2)  # box width/height maps
    with torch.no_grad():
        shrunk.out.weight[wh] *= 0.5
        shrunk.out.bias[wh] *= 0.5
    to_onnx(adapter, shrunk, tiny.export, tmp / "shrunk.onnx")
    return tmp


def make_candidate(
    root: Path, onnx_path: Path, manifest: dict, tiny: Params, report: str = "fp32", **kpis
) -> dict:
    """The artifact folders the stage reads, under `root`: a real engine built from
    `onnx_path`, evaluate metrics (KPIS, overridden by `kpis`) and a quantize report that says
    `precision: <report>` written here."""
    (root / "quantize").mkdir(parents=True)
    (root / "quantize" / "model.onnx").write_bytes(onnx_path.read_bytes())
    cfg = tiny.build_engine.model_copy(update={"targets": ["onnxruntime"]})
    build_engine.run(
        cfg,
        target="onnxruntime",
        onnx_path=root / "quantize" / "model.onnx",
        out=root / "build_engine" / "onnxruntime" / "engine",
    )
    metrics = {"target": "onnxruntime", "status": "ok", "test_images": 32, **KPIS, **kpis}
    base = {**KPIS, "map50": 0.96, "name": "pytorch_eager_fp32"}
    for k in ("map50", "map50_95", "precision", "recall"):
        metrics[f"delta_{k}"] = metrics[k] - base[k]
    metrics["delta_ap50_per_class"] = kpis.pop("per_class", {str(c): -0.01 for c in range(1, 11)})
    metrics["baseline"] = base
    (root / "evaluate" / "onnxruntime").mkdir(parents=True)
    (root / "evaluate" / "onnxruntime" / "metrics.json").write_text(json.dumps(metrics))
    (root / "quantize" / "report.json").write_text(
        json.dumps({"calibration": {"md5": "c" * 32}, "precision": report})
    )
    (root / "label_qa").mkdir()
    (root / "label_qa" / "report.json").write_text(json.dumps({"findings": []}))
    (root / "label_qa" / "manifest.json").write_text(json.dumps(manifest))
    (root / "export").mkdir()
    (root / "export" / "metrics.json").write_text(json.dumps({"parity_max_abs_diff": 1e-6}))
    return {
        "evaluations": root / "evaluate",
        "onnx": root / "quantize" / "model.onnx",
        "engines": root / "build_engine",
        "quantize_report": root / "quantize" / "report.json",
        "label_qa_report": root / "label_qa" / "report.json",
        "export_metrics": root / "export" / "metrics.json",
        "manifest": root / "label_qa" / "manifest.json",
    }


def params_for(name: str, gates: list[dict], **promote) -> Params:
    raw = tiny_params()
    raw["project"]["registered_model"] = name
    raw["build_engine"]["targets"] = ["onnxruntime"]
    raw["promote"] = {"target": "onnxruntime", "gates": gates, "lock_timeout_s": 30, **promote}
    return Params.model_validate(raw)


GATES = [
    {"kind": "absolute", "kpi": "map50", "op": ">=", "value": 0.9},
    {"kind": "relative", "kpi": "map50", "min_delta_points": -2.0},
    {"kind": "per_class", "max_drop_points": 3.0},
    {"kind": "non_regression", "tolerance_points": 1.0, "resamples": 300, "seed": 0},
]


def promote(uri: str, params: Params, candidate: dict, out: Path) -> dict:
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "promote-tests")).info.run_id
    return stage.run(
        params,
        inputs=stage.Inputs(**candidate),
        out=out,
        client=client,
        run_id=run_id,
        lineage={
            "git_commit": "0" * 40,
            "dvc_lock_md5": "1" * 32,
            "data_md5": "2" * 32,
            "mlflow_parent_run_id": run_id,
        },
    )


def promote_cli(uri: str, params: Path, candidate: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m tasks.promote` (the stage's entry point) on `candidate`, output in cwd/out."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in candidate.items()]
    return subprocess.run(
        [sys.executable, "-m", "tasks.promote", "--params", str(params), *args, "--out", "out"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        timeout=300,
    )


def aliases(uri: str, name: str) -> dict[str, str]:
    return dict(MlflowClient(uri).get_registered_model(name).aliases)


@pytest.fixture(scope="module")
def candidates(onnx_models, tiny_manifest, tiny, tmp_path_factory):
    """good / good2 / good3 (pass) / weak (fails the absolute map50 gate) / shrunk (a real
    regression) candidates."""
    root = tmp_path_factory.mktemp("candidates")
    good = onnx_models / "good.onnx"
    return {
        "good": make_candidate(root / "good", good, tiny_manifest, tiny),
        "good2": make_candidate(root / "good2", onnx_models / "good2.onnx", tiny_manifest, tiny),
        "good3": make_candidate(root / "good3", onnx_models / "good3.onnx", tiny_manifest, tiny),
        # its quantize report claims int8 for a float graph (keep_faster undid every layer)
        "weak": make_candidate(
            root / "weak", onnx_models / "weak.onnx", tiny_manifest, tiny, "int8", map50=0.5
        ),
        "shrunk": make_candidate(root / "shrunk", onnx_models / "shrunk.onnx", tiny_manifest, tiny),
    }


# ---------------------------------------------------------------- bootstrap (no server)


def test_bootstrap_ap_equals_cocoeval_and_identical_models_have_a_zero_interval(
    onnx_models, tiny_manifest, tiny
):
    test = DetectionSet(tiny_manifest, "test", tiny.train.input_size)
    cfg = tiny.build_engine
    rows = {}
    for name in ("good", "shrunk"):
        out = onnx_models / f"engine-{name}"
        build_engine.run(cfg, target="onnxruntime", onnx_path=onnx_models / f"{name}.onnx", out=out)
        rows[name] = predict(get("onnxruntime").load(out, cfg), test)
    for name, r in rows.items():
        ours = bootstrap.map50(bootstrap.match_table(test.coco, r), np.ones((1, len(test))))[0]
        assert ours == pytest.approx(coco_metrics(test.coco, r, 0.3)["map50"], abs=1e-9), name
    same = bootstrap.paired_bootstrap(
        test.coco, rows["good"], rows["good"], resamples=200, confidence=0.95, seed=0
    )
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0
    worse = bootstrap.paired_bootstrap(
        test.coco, rows["shrunk"], rows["good"], resamples=200, confidence=0.95, seed=0
    )
    assert worse["diff"] < -0.1 and worse["ci_low"] <= worse["diff"] <= worse["ci_high"] < 0
    again = bootstrap.paired_bootstrap(
        test.coco, rows["shrunk"], rows["good"], resamples=200, confidence=0.95, seed=0
    )
    assert again == worse  # seeded


@pytest.mark.parametrize(
    ("gate", "expected"),
    [
        (
            {"kind": "absolute", "kpi": "mAP", "op": ">=", "value": 0.9},
            "params.yaml: promote.gates.0.absolute.kpi: Input should be 'map50'",
        ),
        (
            {"kind": "absolute", "kpi": "map50", "op": "=>", "value": 0.9},
            "params.yaml: promote.gates.0.absolute.op: Input should be '>=', '<=', '>' or '<'",
        ),
        ({"kind": "typo", "kpi": "map50"}, "params.yaml: promote.gates.0: Input tag 'typo'"),
        (
            {"kind": "non_regression", "resamples": 5},
            "params.yaml: promote.gates.0.non_regression.resamples: Input should be greater",
        ),
        (
            {"kind": "per_class", "max_drop_points": 1, "bogus": 1},
            "params.yaml: promote.gates.0.per_class.bogus: unknown key",
        ),
    ],
)
def test_a_bad_gate_names_its_key(tmp_path, gate, expected):
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["promote"]["gates"] = [gate]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert expected in str(err.value)


def test_promote_target_must_be_built(tmp_path):
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["build_engine"]["targets"] = ["openvino"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="params.yaml: promote.target: 'onnxruntime' is not"):
        load_params(tmp_path / "params.yaml")


def test_promote_needs_its_section_and_gates_unless_none_is_meant(tmp_path):
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for promote_section in ({"target": "onnxruntime"}, {"gates": []}):
        raw["promote"] = promote_section
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match="params.yaml: promote.gates: empty: every"):
            load_params(tmp_path / "params.yaml")
    raw["promote"] = {"gates": [], "allow_no_gates": True}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    stage.require_gates(load_params(tmp_path / "params.yaml"))  # meant: accepted
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(ConfigError, match="params.yaml: promote: section missing"):
        stage.require_gates(load_params(tmp_path / "params.yaml"))  # built-in defaults


def test_numeric_format_is_read_from_the_graph(onnx_models, tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = numeric_format(onnx_models / "good.onnx")
    assert fp32 == {
        "numeric_format": "fp32",
        "quantize_linear_nodes": 0,
        "dequantize_linear_nodes": 0,
        "integer_op_nodes": 0,
    }
    graph = onnx.load(str(onnx_models / "good.onnx")).graph
    name, (w, h) = graph.input[0].name, candidate.input_size(onnx_models / "good.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter(
                [{name: rng.random((1, 3, h, w), dtype=np.float32)} for _ in range(4)]
            )

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(onnx_models / "good.onnx"),
        str(tmp_path / "int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    int8 = numeric_format(tmp_path / "int8.onnx")
    assert int8["numeric_format"] == "int8" and int8["quantize_linear_nodes"] > 0


# ---------------------------------------------------------------- registry (real server)


@pytest.mark.server
def test_pass_becomes_champion_fail_stays_challenger_regression_is_refused(
    mlflow_server, candidates, tmp_path
):
    name = "verdicts"
    params = params_for(name, GATES)
    client = MlflowClient(mlflow_server)

    first = promote(mlflow_server, params, candidates["good"], tmp_path / "1")
    assert first["outcome"] == "champion" and first["version"] == 1
    assert first["gates"]["non_regression"]["reason"] == "no champion"
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "1"}
    decision = json.loads((tmp_path / "1" / "decision.json").read_text())
    assert decision["passed"] is True and decision["champion_before"] is None
    card = (tmp_path / "1" / "model_card.md").read_text()
    assert "| map50 | 0.95 |" in card and "calibration_md5" in card
    mv = client.get_model_version(name, "1")
    for tag in ("git_commit", "dvc_lock_md5", "data_md5", "calibration_md5", "label_qa_report_md5"):
        assert mv.tags[tag], tag
    assert mv.tags["mlflow_parent_run_id"] == mv.run_id  # (the tests' stand-in parent)
    assert mv.tags["gate"] == "passed" and float(mv.tags["map50"]) == 0.95
    assert mv.tags["promotion"] == "champion" and mv.description.startswith("# Model card")
    # the numeric format (from the graph) and the precision KPI keep their own names
    assert mv.tags["numeric_format"] == "fp32" and mv.tags["quantize_linear_nodes"] == "0"
    assert mv.tags["precision"] == "0.8" and decision["numeric_format"] == "fp32"
    assert "numeric format `fp32` (0 QuantizeLinear nodes" in card
    assert "| precision (KPI) | 0.8 |" in card and "deployed precision" not in card

    weak = promote(mlflow_server, params, candidates["weak"], tmp_path / "2")
    assert weak["outcome"] == "challenger" and not weak["passed"]
    assert weak["reasons"] == ["absolute.map50: map50 0.5 < 0.9", weak["reasons"][1]]
    assert weak["reasons"][1].startswith("relative.map50: map50 vs FP32 -46.00 points")
    tags = client.get_model_version(name, "2").tags
    assert tags["gate"] == "failed" and "map50 0.5 < 0.9" in tags["gate_reasons"]
    assert tags["numeric_format"] == "fp32"  # its report says int8: the graph wins
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "2"}

    worse = promote(mlflow_server, params, candidates["shrunk"], tmp_path / "3")
    nr = worse["gates"]["non_regression"]
    assert not nr["passed"] and nr["champion_version"] == "1"
    assert nr["ci_low_points"] <= nr["diff_points"] <= nr["ci_high_points"] < -1.0
    assert "worse beyond noise" in nr["reason"]
    # its fabricated KPIs pass every other gate: the bootstrap alone refuses it
    assert [r.split(":")[0] for r in worse["reasons"]] == ["non_regression"]
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "3"}

    same = promote(mlflow_server, params, candidates["good2"], tmp_path / "4")
    assert same["outcome"] == "champion"
    assert same["gates"]["non_regression"]["diff_points"] == 0.0
    assert aliases(mlflow_server, name) == {"champion": "4", "challenger": "4", "previous": "1"}
    history = AliasLedger(client, name).history()
    assert [t["state"] for t in history] == ["done"] * 4
    assert history[-1]["moves"][1:] == [
        {"alias": "champion", "from": "1", "to": "4"},
        {"alias": "previous", "from": None, "to": "1"},
    ]
    assert all(t["user"] and t["host"] and t["pid"] and t["at"] for t in history)
    # The ledger is a tracking run, not registered models beside the real one.
    names = [rm.name for rm in client.search_registered_models(max_results=1000)]
    assert name in names and not [n for n in names if "alias-move" in n or "ledger" in n]
    ledger_exp = client.get_experiment_by_name(f"{name}.alias-ledger")
    assert len(client.search_runs([ledger_exp.experiment_id])) == 1


@pytest.mark.server
def test_two_promotions_at_once_leave_one_champion_and_a_consistent_previous(
    mlflow_server, candidates, tmp_path
):
    name = "race"
    params = params_for(name, GATES[:1])
    promote(mlflow_server, params, candidates["good"], tmp_path / "seed")  # v1 is champion
    results, errors = {}, []

    def contender(key: str) -> None:
        try:
            results[key] = promote(mlflow_server, params, candidates[key], tmp_path / key)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=contender, args=(k,)) for k in ("good2", "good3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    outcomes = sorted(r["outcome"] for r in results.values())
    assert outcomes == ["challenger", "champion"]
    winner = next(r for r in results.values() if r["outcome"] == "champion")
    loser = next(r for r in results.values() if r["outcome"] == "challenger")
    assert winner["champion_before"] == loser["champion_before"] == "1"  # both read v1
    assert "champion moved from v1 to" in loser["note"]
    final = aliases(mlflow_server, name)
    assert final["champion"] == str(winner["version"]) and final["previous"] == "1"

    # And the primitive itself, with several writers released at the same instant.
    ledger = AliasLedger(MlflowClient(mlflow_server), name)
    champion = ledger.snapshot().champion
    barrier, won, lost = threading.Barrier(5), [], []

    def racer(version: str) -> None:
        mine = AliasLedger(MlflowClient(mlflow_server), name)
        barrier.wait()
        try:
            mine.move(
                {"champion": version, "previous": champion},
                action="test",
                version=version,
                expect_champion=champion,
            )
            won.append(version)
        except ChampionMoved:
            lost.append(version)

    # Only versions other than the champion: a racer "moving" the champion to itself leaves it
    # where it was, so the next racer's expect_champion still holds and it may win too.
    others = [v for v in ("1", "2", "3") if v != champion]
    versions = (others * 5)[:5]
    threads = [threading.Thread(target=racer, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 4
    assert aliases(mlflow_server, name)["champion"] == won[0]
    assert aliases(mlflow_server, name)["previous"] == champion
    moves = [t for t in ledger.history() if t["action"] == "test"]
    assert len(moves) == 1 and moves[0]["state"] == "done"


@pytest.mark.server
def test_a_move_waits_for_one_in_flight_and_takes_over_an_abandoned_one(mlflow_server):
    client = MlflowClient(mlflow_server)
    name = "inflight"
    client.create_registered_model(name)
    v1 = client.create_model_version(name, source="s3://nowhere/model").version
    ledger = AliasLedger(client, name, lock_timeout_s=30)
    run = ledger.run_id  # the ledger run (created on first use)
    # Another writer holds transaction 1 and is still moving aliases.
    client.log_param(run, "claim.000001", f"{int(time.time() * 1000)}:another-writer")
    client.set_tag(run, "txn.000001.state", "claimed")
    finish = threading.Timer(1.5, client.set_tag, (run, "txn.000001.state", "done"))
    finish.start()
    t0 = time.perf_counter()
    record = ledger.move({"challenger": str(v1)}, action="test")
    assert time.perf_counter() - t0 >= 1.4  # it waited for transaction 1 to finish
    assert record["seq"] == 2 and aliases(mlflow_server, name) == {"challenger": str(v1)}

    # A writer that crashed right after claiming transaction 3, a minute ago.
    client.log_param(run, "claim.000003", f"{int(time.time() * 1000) - 60_000}:crashed")
    record = ledger.move({"champion": str(v1)}, action="test", expect_champion=None)
    assert record["seq"] == 4
    states = [t["state"] for t in ledger.history()]
    assert states == ["done", "done", "abandoned", "done"]
    # A claim is write-once: nobody can take transaction 4 again.
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        client.log_param(run, "claim.000004", "0:late-writer")


@pytest.mark.server
def test_writers_that_start_a_ledger_at_once_share_one_run(mlflow_server):
    name = "fresh"
    barrier, ids, errors = threading.Barrier(4), [], []

    def writer() -> None:
        ledger = AliasLedger(MlflowClient(mlflow_server), name, lock_timeout_s=30)
        barrier.wait()
        try:
            ids.append(ledger.run_id)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 4 and len(set(ids)) == 1
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(f"{name}.alias-ledger")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == ids[:1]


@pytest.mark.server
def test_review_cli_promotes_rejects_and_rolls_back(mlflow_server, candidates, tmp_path):
    from tasks.cli.app import app

    name = "review"
    params = params_for(name, GATES[:1])
    for i, key in enumerate(("good", "weak", "good2")):
        promote(mlflow_server, params, candidates[key], tmp_path / str(i))
    assert aliases(mlflow_server, name) == {"champion": "3", "challenger": "3", "previous": "1"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    cli = CliRunner()
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "COLUMNS": "250"}  # rich: no wrapping

    def shrinkflow(*args: str):
        return cli.invoke(app, [*args, "--params", str(path)], env=env)

    listed = shrinkflow("review")
    assert listed.exit_code == 0, listed.output
    assert "v2" in listed.output and "map50 0.5 < 0.9" in listed.output
    assert "champion v3" in listed.output

    # v2 failed its gates: promoting it takes --force and a reason, both recorded.
    refused = shrinkflow("promote", "2")
    assert refused.exit_code == 1 and "--force" in refused.output, refused.output
    assert shrinkflow("promote", "2", "--force").exit_code == 1  # no reason given
    assert aliases(mlflow_server, name)["champion"] == "3"
    forced = shrinkflow("promote", "2", "--force", "--reason", "the field trial needs it")
    assert forced.exit_code == 0, forced.output
    assert "did not pass its gates" in forced.output  # the warning
    assert aliases(mlflow_server, name)["champion"] == "2"
    tags = MlflowClient(mlflow_server).get_model_version(name, "2").tags
    assert tags["review"] == "approved" and tags["review_forced"] == "true"
    assert tags["review_reason"] == "the field trial needs it"
    assert "map50 0.5 < 0.9" in tags["review_forced_gate_reasons"]
    moves = AliasLedger(MlflowClient(mlflow_server), name).history()
    assert moves[-1]["action"] == "human-promote-forced"
    assert "the field trial needs it (forced past failed gates" in moves[-1]["reason"]
    assert shrinkflow("rollback", "--reason", "trial over").exit_code == 0
    assert aliases(mlflow_server, name) == {"champion": "3", "challenger": "3", "previous": "1"}

    rejected = shrinkflow("reject", "2", "--reason", "misses the small digits")
    assert rejected.exit_code == 0, rejected.output
    tags = MlflowClient(mlflow_server).get_model_version(name, "2").tags
    assert tags["review"] == "rejected" and tags["review_reason"] == "misses the small digits"
    again = shrinkflow("reject", "2", "--reason", "changed my mind")
    assert again.exit_code == 1 and "rejected already" in again.output, again.output
    tags = MlflowClient(mlflow_server).get_model_version(name, "2").tags
    assert tags["review_reason"] == "misses the small digits"  # the first decision stands
    assert shrinkflow("promote", "2", "--force", "--reason", "x").exit_code == 1  # rejected

    back = shrinkflow("rollback", "--reason", "latency regression in the field")
    assert back.exit_code == 0, back.output
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "3"}
    forward = shrinkflow("promote", "3", "--reason", "field issue was the camera")
    assert forward.exit_code == 0, forward.output
    assert aliases(mlflow_server, name) == {"champion": "3", "challenger": "3", "previous": "1"}
    assert shrinkflow("reject", "3", "--reason", "x").exit_code == 1  # champion: roll back first
    history = shrinkflow("review", "--history")
    assert history.exit_code == 0 and "rollback" in history.output


@pytest.mark.server
def test_review_finds_the_project_or_refuses_and_never_creates_a_store(
    mlflow_server, candidates, tmp_path, monkeypatch
):
    from tasks.cli.app import app

    name = "where"
    params = params_for(name, GATES[:1])
    promote(mlflow_server, params, candidates["good"], tmp_path / "out")
    project = tmp_path / "project"
    (project / "sub" / "dir").mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    (project / "dvc.yaml").write_text("stages: {}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = CliRunner()
    wide = {"COLUMNS": "250"}

    monkeypatch.chdir(project / "sub" / "dir")  # the project is found above
    found = cli.invoke(app, ["review"], env={**wide, "MLFLOW_TRACKING_URI": mlflow_server})
    assert found.exit_code == 0, found.output
    assert f"{name}: champion v1" in found.output

    local = cli.invoke(app, ["review"], env={**wide, "MLFLOW_TRACKING_URI": None})
    assert local.exit_code == 1  # the project's own store does not exist: refuse, create none
    assert "mlflow.db: no MLflow store" in local.output, local.output
    assert not list(project.rglob("mlflow.db"))

    monkeypatch.chdir(elsewhere)
    outside = cli.invoke(app, ["review"], env={**wide, "MLFLOW_TRACKING_URI": None})
    assert outside.exit_code == 1
    assert "is not inside a Shrinkflow project" in outside.output, outside.output
    assert not list(elsewhere.iterdir())  # no mlflow.db, no mlruns


@pytest.mark.server
def test_one_version_per_candidate_a_fixed_promote_judges_the_same_version(
    mlflow_server, candidates, tmp_path
):
    name = "once"
    client = MlflowClient(mlflow_server)
    strict = params_for(name, [{"kind": "absolute", "kpi": "map50", "op": ">=", "value": 0.9}])
    first = promote(mlflow_server, strict, candidates["weak"], tmp_path / "1")
    assert first["version"] == 1 and first["outcome"] == "challenger" and first["new_version"]
    # The gate was wrong for this model; fixed, the same candidate is promoted again.
    fixed = params_for(name, [{"kind": "absolute", "kpi": "map50", "op": ">=", "value": 0.4}])
    second = promote(mlflow_server, fixed, candidates["weak"], tmp_path / "2")
    assert second["version"] == 1 and not second["new_version"]
    assert second["outcome"] == "champion" and second["passed"]
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    mv = client.get_model_version(name, "1")
    assert mv.tags["gate"] == "passed" and mv.tags["gate.absolute.map50"].startswith("passed")
    assert "map50 0.5 >= 0.4" in mv.description  # the card of the latest judgement
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "1"}
    # Again, unchanged: still v1, still the champion, and `previous` does not point to itself.
    third = promote(mlflow_server, fixed, candidates["weak"], tmp_path / "3")
    assert third["version"] == 1 and third["outcome"] == "champion"
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "1"}
    other = promote(mlflow_server, fixed, candidates["good"], tmp_path / "4")  # another ONNX
    assert other["version"] == 2 and other["new_version"]


@pytest.mark.server
def test_a_failure_after_registering_deletes_the_version(
    mlflow_server, candidates, tmp_path, monkeypatch
):
    name = "midway"
    params = params_for(name, GATES[:1])

    def broken(self, *args, **kwargs):
        raise MlflowException("injected: the server went away", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException, match="injected"):
        promote(mlflow_server, params, candidates["good"], tmp_path / "out")
    monkeypatch.undo()
    client = MlflowClient(mlflow_server)
    assert not client.search_registered_models(f"name = '{name}'")  # created by it: gone
    assert not client.search_model_versions(f"name = '{name}'")
    assert [t["state"] for t in AliasLedger(client, name).history()] == ["failed"]
    assert not (tmp_path / "out" / "decision.json").exists()


@pytest.mark.server
def test_with_the_server_down_the_stage_names_the_uri_and_registers_nothing(
    mlflow_server, candidates, tmp_path
):
    """A tracking URI nobody answers at (a free port): the stage fails fast naming it, and the
    registry that holds the model's versions (the session's server) gets no new one."""
    name = "down"
    params = params_for(name, GATES[:1])
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    promote(mlflow_server, params, candidates["good"], tmp_path / "first")
    down = f"http://127.0.0.1:{free_port()}"
    proc = promote_cli(down, path, candidates["good"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"MLflow tracking at {down} is not usable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "decision.json").exists()
    client = MlflowClient(mlflow_server)
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert aliases(mlflow_server, name) == {"champion": "1", "challenger": "1"}


@pytest.mark.server
def test_promote_without_its_params_section_registers_nothing(mlflow_server, candidates, tmp_path):
    (tmp_path / "params.yaml").write_text("")  # every stage would run on built-in defaults
    default_name = Params().project.registered_model
    client = MlflowClient(mlflow_server)
    # the server is shared by the session: other tests may have registered the default name
    before = {v.version for v in client.search_model_versions(f"name = '{default_name}'")}
    proc = promote_cli(mlflow_server, tmp_path / "params.yaml", candidates["weak"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    # the stage entry's section check names every section promote reads, promote first
    assert "params.yaml: promote" in proc.stderr and "section missing" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    after = {v.version for v in client.search_model_versions(f"name = '{default_name}'")}
    assert after == before


@pytest.mark.server
def test_no_gates_only_when_the_params_say_so(mlflow_server, candidates, tmp_path):
    name = "ungated"
    with pytest.raises(ValueError, match="promote.gates: empty"):
        params_for(name, [])
    decision = promote(
        mlflow_server, params_for(name, [], allow_no_gates=True), candidates["weak"], tmp_path
    )
    assert decision["outcome"] == "champion" and decision["gates"] == {}
    tags = MlflowClient(mlflow_server).get_model_version(name, "1").tags
    assert tags["gate_reasons"] == "no gates (promote.allow_no_gates: true)"
    assert "(none: promote.allow_no_gates is true)" in (tmp_path / "model_card.md").read_text()


class _Planted:
    """Unpickling this creates `path`: what a registry writer could make a loader run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.server
def test_the_registered_model_holds_no_pickle_and_the_champion_is_never_executed(
    mlflow_server, candidates, tiny_manifest, tmp_path, monkeypatch
):
    import pickle

    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd

    name = "nopickle"
    client = MlflowClient(mlflow_server)
    params = params_for(name, GATES)
    promote(mlflow_server, params, candidates["good"], tmp_path / "1")
    mv = client.get_model_version(name, "1")
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(tmp_path / "v1"), tracking_uri=mlflow_server
        )
    )
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert "served_model.py" in files and "artifacts/detector.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    pyfunc_conf = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc_conf["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "model_code_path" in pyfunc_conf and "python_model" not in pyfunc_conf
    assert "cloudpickle" not in (local / "requirements.txt").read_text()

    # MLflow's own loader, with pickle refused, still serves it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    images = [
        Path(tiny_manifest["root"]) / im["file_name"]
        for im in tiny_manifest["splits"]["test"]["images"][:2]
    ]
    frame = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in images]}))
    assert len(frame) > 0 and set(frame["image"]) <= {0, 1}
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # Someone with write access to the registry plants code in the champion's model.
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "python_model.pkl").write_bytes(pickle.dumps(_Planted(tmp_path / "unpickled")))
    (planted / "served_model.py").write_text(f"open({str(tmp_path / 'executed')!r}, 'w')\n")
    for f in planted.iterdir():
        client.log_artifact(mv.run_id, str(f), "model")
    second = promote(mlflow_server, params, candidates["good2"], tmp_path / "2")
    nr = second["gates"]["non_regression"]
    assert nr["champion_version"] == "1" and nr["diff_points"] == 0.0  # the champion did run
    assert not (tmp_path / "unpickled").exists() and not (tmp_path / "executed").exists()


# ---------------------------------------------------------------- serving


@pytest.mark.server
@pytest.mark.slow
def test_champion_is_served_over_http_with_the_evaluate_detections(
    mlflow_server, candidates, tiny_manifest, tiny, tmp_path
):
    import mlflow.pyfunc
    import pandas as pd

    name = "served"
    params = params_for(name, GATES[:1])
    promote(mlflow_server, params, candidates["good"], tmp_path / "out")
    test = DetectionSet(tiny_manifest, "test", tiny.train.input_size)
    engine = candidates["good"]["engines"] / "onnxruntime" / "engine"
    expected = predict(get("onnxruntime").load(engine, tiny.build_engine), test)  # evaluate's
    files = [Path(tiny_manifest["root"]) / im["file_name"] for im in test.coco["images"][:4]]
    ids = [im["id"] for im in test.coco["images"][:4]]

    def same(frame: pd.DataFrame) -> None:
        for j, image_id in enumerate(ids):
            want = sorted(
                (r for r in expected if r["image_id"] == image_id), key=lambda r: -r["score"]
            )
            got = frame[frame["image"] == j].sort_values("score", ascending=False)
            assert len(got) == len(want) > 0
            np.testing.assert_allclose(got["score"], [r["score"] for r in want], atol=1e-5)
            np.testing.assert_allclose(
                got[["x", "y", "width", "height"]].to_numpy(),
                [r["bbox"] for r in want],
                atol=1e-3,
            )
            assert got["category_id"].tolist() == [r["category_id"] for r in want]

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    inputs = pd.DataFrame({"image": [f.read_bytes() for f in files]})
    same(model.predict(inputs))

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "models",
            "serve",
            "-m",
            f"models:/{name}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=venv_env(MLFLOW_TRACKING_URI=mlflow_server),  # it execs `uvicorn` from PATH
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail((tmp_path / "serve.log").read_text()[-3000:])
                time.sleep(1)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files],
            }
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        same(pd.DataFrame(answer["predictions"]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
