"""`fedlowrank sweep privacy` end to end on the shipped config, shrunk: ε honoured per cell, each method at its
own settings, outputs written with their command, finished cells never re-run."""

import csv
import math
from pathlib import Path

from typer.testing import CliRunner

from fedlowrank.cli import app
from fedlowrank.config import RunConfig

CONFIG = Path(__file__).resolve().parent.parent / "simulations" / "privacy_sweep.toml"

SHRINK = [
    "num-clients=2", "num-rounds=1", "data.max-train-examples=200", "data.max-test-examples=48",
    "data.max-length=24", "train.batch-size=32",
]  # fmt: skip


def test_privacy_sweep_runs_each_method_at_its_own_settings_and_resumes(data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep", "privacy", "-c", str(CONFIG), "--data-dir", str(data_dir),
        "--strategies", "fedit,ffa", "--epsilons", "3,inf", "--seeds", "1", "--output", str(out),
        "--method-set", "ffa:lora.alpha=64", "--method-set", "ffa:dp.lr=8",
        *(word for item in SHRINK for word in ("--set", item)),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    rows = {(r["strategy"], r["epsilon"]): r for r in csv.DictReader((out / "privacy.csv").open())}
    assert set(rows) == {("fedit", "3"), ("fedit", "inf"), ("ffa", "3"), ("ffa", "inf")}
    for (_, epsilon), row in rows.items():
        accuracy = float(row["test_accuracy"])
        assert 0.0 <= accuracy <= 1.0
        if epsilon == "3":
            assert 0 < float(row["epsilon_spent_max"]) <= 3.0 + 1e-9  # the budget holds
            assert float(row["noise_multiplier_mean"]) > 0
        else:
            assert row["epsilon_spent_max"] == "" and row["noise_multiplier_mean"] == ""

    saved = {
        name: RunConfig.from_toml(out / "runs" / f"{name}_seed-0" / "config.toml")
        for name in ("fedit_eps-3", "ffa_eps-3", "ffa_eps-inf")
    }
    assert saved["fedit_eps-3"].lora.alpha == 16 and saved["fedit_eps-3"].dp.lr == 4
    assert saved["ffa_eps-3"].lora.alpha == 64 and saved["ffa_eps-3"].dp.lr == 8
    assert saved["ffa_eps-inf"].lora.alpha == 64 and math.isclose(saved["ffa_eps-inf"].dp.epsilon, 0.0)

    report = (out / "privacy.md").read_text()
    assert "- ffa: `lora.alpha = 64`, `dp.lr = 8`" in report
    assert "fedlowrank sweep privacy" in report and "--method-set ffa:lora.alpha=64" in report
    assert (out / "privacy.png").stat().st_size > 0

    summary = out / "runs" / "ffa_eps-3_seed-0" / "summary.json"
    before = summary.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert summary.stat().st_mtime_ns == before  # finished cells are not re-run

    changed = [a.replace("ffa:dp.lr=8", "ffa:dp.lr=16") for a in args]
    refused = CliRunner().invoke(app, changed)
    assert refused.exit_code == 2  # a folder holding a run of other settings is never reused
    assert "holds a run of other settings" in " ".join(refused.output.split())
