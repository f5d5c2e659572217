import subprocess
import sys

import pytest
import yaml

from tasks.harness.config import load_params
from tasks.harness.errors import ConfigError
from tasks.harness.project import ROOT


def write(tmp_path, mutate):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_default_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.build_engine.targets == ["onnxruntime", "openvino", "tensorrt", "litert"]
    assert params.build_engine.openvino_precision == "f32"  # bf16 is this CPU's default


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["train"].update(epoch=3), "params.yaml: train.epoch: unknown key"),
        (
            lambda p: p["train"].update(epochs="many"),
            "params.yaml: train.epochs: Input should be a valid integer",
        ),
        (
            lambda p: p["train"].update(epochs=0),
            "params.yaml: train.epochs: Input should be greater than 0",
        ),
        (lambda p: p.update(trian={}), "params.yaml: trian: unknown key"),
        (
            lambda p: p["build_engine"].update(targets=["tensorrtx"]),
            "params.yaml: build_engine.targets.0:",
        ),
        (
            lambda p: p["quantize"].update(calibrator="kl2"),
            "params.yaml: quantize.calibrator: Input should be 'minmax', 'entropy' or 'percentile'",
        ),
        (
            lambda p: p["prune"].update(importance="random"),
            "params.yaml: prune.importance: Input should be 'l1', 'l2', 'bn_scale' or 'taylor'",
        ),
        (
            lambda p: p["prune"].update(macs_reduction=1.0),
            "params.yaml: prune.macs_reduction: Input should be less than 0.95",
        ),
        (
            lambda p: p["data"].update(digit_size=[40, 20]),
            "params.yaml: data: Value error, digit_size",
        ),
        (  # ONNX Runtime's CPU INT8 takes u8 activations only
            lambda p: p["quantize"].update(activation_type="qint8"),
            "params.yaml: quantize.activation_type: qint8 cannot serve build_engine.targets "
            "onnxruntime",
        ),
        (  # TensorRT's explicit quantization takes symmetric s8 activations only
            lambda p: p["quantize"].update(activation_type="quint8"),
            "params.yaml: quantize.activation_type: quint8 cannot serve build_engine.targets "
            "tensorrt",
        ),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, expected):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, mutate))
    assert expected in str(err.value)


def test_typo_in_params_exits_2_before_any_work(tmp_path):
    bad = write(tmp_path, lambda p: p["train"].update(epoch=3))
    out = tmp_path / "train-out"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "params.yaml: train.epoch: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not (tmp_path / "mlflow.db").exists()  # failed before touching MLflow


@pytest.fixture
def project(tmp_path):
    from tasks.harness.project import copy_project, profile_params

    return copy_project(tmp_path / "proj", profile_params("tiny"))


def set_params(proj, mutate):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    mutate(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_misspelt_section_fails_dvc_repro_even_when_all_is_up_to_date(project):
    from tasks.harness.project import dvc

    first = dvc(project, "repro", "check_params")
    assert first.returncode == 0, first.stdout + first.stderr
    assert dvc(project, "status", "check_params").stdout.strip().endswith("up to date.")
    set_params(project, lambda p: p.update(trian={"epochs": 3}))
    out = dvc(project, "repro")
    assert out.returncode != 0
    assert "params.yaml: trian: unknown key" in out.stdout + out.stderr
    assert "Running stage 'ingest'" not in out.stdout  # it fails first
    assert not (project / "artifacts" / "ingest" / "manifest.json").exists()


@pytest.mark.parametrize("value", ["data/d$(touch pwned)", "data/d'; touch pwned; echo '"])
def test_a_shell_command_in_a_path_param_never_runs(project, value):
    from tasks.harness.project import dvc

    set_params(project, lambda p: p["dataset"].update(path=value))
    out = dvc(project, "repro")
    assert out.returncode != 0
    assert "params.yaml: dataset.path:" in out.stdout + out.stderr
    assert not (project / "pwned").exists()
    # the stage command quotes what it interpolates, even run on its own
    if "'" not in value:
        single = dvc(project, "repro", "--single-item", "ingest")
        assert single.returncode != 0 and not (project / "pwned").exists()
        # DVC refuses first: the folder named by the value (an `ingest` dep) does not exist
        assert "touch pwned" in single.stdout + single.stderr


def test_a_stage_refuses_params_without_its_sections(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="params.yaml: promote, project: section missing"):
        load_params(empty, ("promote", "project"))
    assert load_params(empty).promote.gates == []  # the file itself is valid


@pytest.mark.parametrize("path", ["data/x;rm", "data/`id`", "-rf", "a|b", "", "x\ny"])
def test_path_params_refuse_shell_metacharacters(tmp_path, path):
    bad = write(tmp_path, lambda p: p["dataset"].update(path=path))
    with pytest.raises(ConfigError, match="params.yaml: dataset.path:"):
        load_params(bad)


def test_litert_can_be_built_and_promoted(tmp_path):
    params = load_params(write(tmp_path, lambda p: p["promote"].update(target="litert")))
    assert params.promote.target == "litert" and "litert" in params.build_engine.targets
