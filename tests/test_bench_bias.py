"""`fedlowrank bench bias` on a small real grid: outputs, the expected ordering of bias, resumability."""

import csv

from typer.testing import CliRunner

from fedlowrank.cli import app


def test_bench_bias_orders_the_methods_and_resumes(data_dir, tmp_path):
    args = [
        "bench", "bias", "--data-dir", str(data_dir), "--output", str(tmp_path / "bench"),
        "--strategies", "fedit,lora-fair,ffa,fedsvd,fedex,flora", "--alphas", "0.5", "--local-steps", "4",
        "--set", "num-clients=3", "--set", "num-rounds=1", "--set", "data.max-train-examples=240",
        "--set", "data.max-test-examples=64", "--set", "data.max-length=32", "--set", "train.batch-size=16",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "bench"
    for name in ("bias.csv", "bias.png", "accuracy.md", "accuracy.csv", "bias_summary.md"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "bias.csv").open()))
    assert len(rows) == 6 * 1
    bias = {}
    for row in rows:
        bias.setdefault(row["strategy"], []).append(float(row["bias_rel_mean"]))
    assert min(bias["fedit"]) > 1e-3
    for fedit_value, fair_value in zip(bias["fedit"], bias["lora-fair"], strict=True):
        assert 0 <= fair_value <= fedit_value
    for exact in ("ffa", "fedsvd", "fedex", "flora"):
        assert max(bias[exact]) < 1e-5, exact

    metrics_file = next((out / "runs").glob("fedit_*/metrics.jsonl"))
    before = metrics_file.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert metrics_file.stat().st_mtime_ns == before  # finished cells are not re-run


def test_bench_bias_rejects_a_bad_heterogeneity_level(data_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "bias", "--data-dir", str(data_dir), "--alphas", "lots", "--output", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "could not convert" in result.output or "lots" in result.output
