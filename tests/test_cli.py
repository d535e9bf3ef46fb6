"""The command line: bad input fails fast with a clear message, before any training starts."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedlowrank.cli import app

runner = CliRunner()


def _run(*args, data_dir):
    return runner.invoke(app, [*args, "--data-dir", str(data_dir)])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=no-such-org/no-such-model", "could not load model"),
        ("dataset=no-such-dataset", "not found"),
        ("data.text-column=sentence", "no column(s) ['sentence']"),
        ("lora.r=1000", "larger than the dimensions"),
        ("num-rouns=2", "Did you mean num-rounds"),
        ("strategy=fedprox-lora", "unknown strategy"),
        ("num-clients=60", "only 50 training examples"),
        ("lora.target-modules=q_proj", "matches no linear layer"),
    ],
)
def test_simulate_refuses_bad_input_before_training(override, message, data_dir, tmp_path):
    result = _run(
        "simulate",
        "--set",
        override,
        "--set",
        "data.max-train-examples=50",
        "--set",
        f"output-dir={tmp_path}",
        data_dir=data_dir,
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # nothing ran


def test_a_client_with_no_data_is_refused(data_dir, tmp_path):
    result = _run(
        "simulate",
        "--set",
        "data.max-train-examples=40",
        "--set",
        "num-clients=30",
        "--set",
        "data.dirichlet-alpha=0.01",
        "--set",
        "data.min-partition-size=0",
        "--set",
        f"output-dir={tmp_path}",
        data_dir=data_dir,
    )
    assert result.exit_code == 2, result.output
    assert "no data" in result.output or "could not partition" in result.output


def test_centralized_train_runs_and_writes_outputs(data_dir, tmp_path):
    result = _run(
        "train",
        "--set",
        "data.max-train-examples=200",
        "--set",
        "data.max-test-examples=64",
        "--set",
        "num-rounds=1",
        "--set",
        "train.local-steps=4",
        "--set",
        f"output-dir={tmp_path}",
        "--name",
        "central",
        data_dir=data_dir,
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "central" / "metrics.jsonl").is_file()
    assert (tmp_path / "central" / "adapter" / "adapter_model.safetensors").is_file()
    assert "test_accuracy" in result.output


def test_keys_lists_every_config_key():
    result = runner.invoke(app, ["keys"])
    assert result.exit_code == 0
    assert "lora.r = 8" in result.output and "dp.epsilon" in result.output
    assert "method.fedsvd.period = 1" in result.output and "LoRA rank" in result.output


def test_core_library_never_imports_flower():
    code = (
        "import sys, fedlowrank.config, fedlowrank.models, fedlowrank.adapters, fedlowrank.data, "
        "fedlowrank.training, fedlowrank.runtime, fedlowrank.report, fedlowrank.centralized, fedlowrank.cli, "
        "fedlowrank.protocol, fedlowrank.engine, fedlowrank.privacy;"
        "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pyproject_flower_config_declares_every_key_with_its_default():
    import tomllib
    from pathlib import Path

    from fedlowrank.config import _flatten
    from simulations.sync_defaults import default_config

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    declared = _flatten(pyproject["tool"]["flwr"]["app"]["config"])
    assert declared == default_config().to_flat()
    assert "method.lora-fair.lambda" in declared and "num-rounds" in declared


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilons", "1,zero"], "could not convert"),
        (["--epsilons", "0,3"], "every ε must be > 0"),
        (["--strategies", "fedit,fedprox"], "unknown strategy"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--method-set", "ffa=lora.alpha"], "expects METHOD:KEY=VALUE"),
        (["--method-set", "fedprox:lora.alpha=64"], "unknown strategy"),
        (["--strategies", "fedit", "--method-set", "ffa:lora.alpha=64"], "which this sweep does not run"),
        (["--method-set", "ffa:lora.alfa=64"], "alfa"),
    ],
)
def test_privacy_sweep_refuses_bad_input_before_any_run(args, message, data_dir, tmp_path):
    result = runner.invoke(
        app, ["sweep", "privacy", *args, "--output", str(tmp_path / "sweep"), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "sweep" / "runs").exists()
