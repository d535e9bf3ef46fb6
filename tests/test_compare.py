"""``fedlowrank compare``: tuned on validation data only, reported over seeds with intervals and paired tests,
resumable."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from fedlowrank.config import ConfigError, RunConfig
from simulations import sweep
from simulations.compare import choose, summary_rows, tuning_cells, validation_score


def _fake_run(tmp_path, name, lr, validation, test):
    run_dir = tmp_path / name
    run_dir.mkdir()
    rows = [{"round": 1, "client_eval_accuracy": validation, "test_accuracy": test}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cell = sweep.Cell(name, {"strategy": "fedit", "seed": 0, "num-rounds": 2, "train.lr": lr}, {"method": "fedit"})
    return sweep.CellRun(cell, run_dir)


def test_selection_reads_validation_never_test(tmp_path):
    # test accuracy ranks the settings in the opposite order: the choice must not follow it
    runs = [
        _fake_run(tmp_path, "a", 1e-3, validation=0.60, test=0.95),
        _fake_run(tmp_path, "b", 3e-3, validation=0.70, test=0.10),
        _fake_run(tmp_path, "c", 1e-2, validation=0.70, test=0.99),  # a tie on validation: the first one wins
    ]
    assert choose(runs) == {"train.lr": 3e-3}
    no_validation = tmp_path / "d"
    no_validation.mkdir()
    (no_validation / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": 0.9}) + "\n")
    with pytest.raises(ConfigError, match="validation"):
        validation_score(sweep.CellRun(sweep.Cell("d", {}, {}), no_validation))


def test_grids_add_alpha_for_ffa_and_lambda_for_lora_fair():
    assert len(tuning_cells("fedit", [1e-3, 1e-2], 2, 0)) == 2
    ffa = tuning_cells("ffa", [1e-3, 1e-2], 2, 0)
    assert len(ffa) == 4 and {c.overrides["lora.alpha"] for c in ffa} == {16, 64}
    assert {c.overrides["num-rounds"] for c in ffa} == {2}
    assert len(tuning_cells("lora-fair", [1e-3], 2, 0)) == 2
    # DP-SGD clients with their own rate: the grid varies dp.lr, which is what they train at
    private = RunConfig.from_flat({"dp.epsilon": 3.0, "dp.lr": 0.5})
    key = private.dp.lr_setting(private.train)[0]
    assert key == "dp.lr" and RunConfig().dp.lr_setting(RunConfig().train)[0] == "train.lr"
    assert {c.overrides[key] for c in tuning_cells("fedit", [1.0, 4.0], 2, 0, key)} == {1.0, 4.0}


def test_summary_pairs_seeds_with_the_reference():
    rows = [
        {"method": m, "seed": s, "test_accuracy": acc}
        for m, accs in {"fedit": [0.78, 0.81, 0.75, 0.83, 0.80], "ffa": [0.80, 0.82, 0.79, 0.85, 0.81]}.items()
        for s, acc in enumerate(accs)
    ]
    by_method = {row["method"]: row for row in summary_rows(rows, "fedit")}
    assert by_method["ffa"]["difference"] == pytest.approx(0.02) and by_method["ffa"]["p_value"] < 0.05
    assert "difference" not in by_method["fedit"] and by_method["fedit"]["n"] == 5


def test_compare_runs_end_to_end_and_resumes(tmp_path, data_dir):
    from fedlowrank.cli import app

    sets = [
        "num-clients=3", "num-rounds=1", "data.max-train-examples=150", "data.max-test-examples=24",
        "data.max-length=24", "data.min-partition-size=5", "train.local-steps=2", "train.batch-size=16",
        "data.validation-fraction=0.2",
    ]  # fmt: skip
    args = [
        "compare", "--data-dir", str(data_dir), "--strategies", "fedit,ffa", "--seeds", "2", "--lrs", "0.01",
        "--tune-rounds", "1", "--output", str(tmp_path), *[p for s in sets for p in ("--set", s)],
    ]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    with (tmp_path / "tuning.csv").open() as handle:
        tuning = list(csv.DictReader(handle))
    assert len(tuning) == 1 + 2 and sum(row["chosen"] == "True" for row in tuning) == 2  # ffa: α 16 or 64
    with (tmp_path / "compare.csv").open() as handle:
        finals = list(csv.DictReader(handle))
    assert sorted((row["method"], row["seed"]) for row in finals) == [
        ("fedit", "0"), ("fedit", "1"), ("ffa", "0"), ("ffa", "1"),
    ]  # fmt: skip
    table = (tmp_path / "compare.md").read_text()
    assert "95 % CI" in table and "paired Δ vs fedit" in table and (tmp_path / "compare.png").stat().st_size > 0
    assert "Command: `fedlowrank compare " in table and "--strategies fedit,ffa --seeds 2" in table
    # the finals run at the chosen setting: the tuning winner's learning rate
    chosen_lr = {row["method"]: row["train.lr"] for row in tuning if row["chosen"] == "True"}
    assert {row["method"]: row["train.lr"] for row in finals} == chosen_lr

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")}
    assert len(stamps) == 7
    again = CliRunner().invoke(app, args)  # finished: nothing runs again
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/summary.json")} == stamps

    refused = CliRunner().invoke(app, [*args, "--set", "data.validation-fraction=0"])
    assert refused.exit_code == 2 and "validation" in refused.output


def test_tune_picks_the_best_validation_learning_rate(tmp_path, data_dir):
    from fedlowrank.cli import app

    sets = [
        "num-clients=3", "data.max-train-examples=150", "data.max-test-examples=24", "data.max-length=24",
        "data.min-partition-size=5", "train.local-steps=2", "train.batch-size=16", "data.validation-fraction=0.2",
    ]  # fmt: skip
    args = ["tune", "--data-dir", str(data_dir), "--lrs", "0.003,0.5", "--tune-rounds", "1", "--output", str(tmp_path)]
    done = CliRunner().invoke(app, [*args, *[p for s in sets for p in ("--set", s)]])
    assert done.exit_code == 0, done.output
    with (tmp_path / "tuning.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["train.lr"] for row in rows] == ["0.003", "0.5"]
    best = max(rows, key=lambda row: float(row["validation_accuracy"]))  # ties: the first, as the tuner does
    assert [row["chosen"] for row in rows] == [str(row is best) for row in rows]
    assert f"train.lr={float(best['train.lr']):g}" in done.output


def test_final_cells_carry_their_setting_so_a_new_choice_never_reuses_old_runs():
    from simulations.compare import final_cells

    old = final_cells("ffa", {"train.lr": 0.01, "lora.alpha": 64}, [0, 1])
    new = final_cells("ffa", {"train.lr": 0.03, "lora.alpha": 16}, [0, 1])
    assert [c.name for c in old] == ["final_ffa_lr-0.01_alpha-64_seed-0", "final_ffa_lr-0.01_alpha-64_seed-1"]
    assert not {c.name for c in old} & {c.name for c in new}


def test_a_cell_folder_holding_a_run_of_other_settings_is_refused(tmp_path, data_dir):
    """Its results would otherwise be reported under the new settings (seen: a wider grid changed the choice)."""
    from fedlowrank.config import RunConfig

    base = RunConfig.from_flat({"data-dir": str(data_dir)})
    cell = sweep.Cell("cell", {"strategy": "ffa", "train.lr": 0.03}, {})
    config = sweep.cell_config(base, cell, tmp_path)
    run_dir = tmp_path / "runs" / "cell"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(sweep.cell_config(base, cell, tmp_path / "elsewhere").to_toml())
    sweep.check_same_settings(run_dir, config)  # same settings written elsewhere: fine to reuse
    other = sweep.Cell("cell", {"strategy": "ffa", "train.lr": 0.01}, {})
    (run_dir / "config.toml").write_text(sweep.cell_config(base, other, tmp_path).to_toml())
    with pytest.raises(ConfigError, match="train.lr = 0.01 there, 0.03 now"):
        sweep.check_same_settings(run_dir, config)
    with pytest.raises(ConfigError, match="other settings"):  # and run_cells checks before running anything
        sweep.run_cells(base, [cell], sweep.SweepRun(tmp_path))
