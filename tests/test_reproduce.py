"""The reproduction report reads a compare folder right: paired differences, verdicts and the tuning edges."""

from __future__ import annotations

import csv

import pytest

from fedlowrank.stats import paired_comparison
from simulations.reproduce.report import Claim, build_report, load_claims, main, verdict


def _write(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def compare_dir(tmp_path):
    # b beats a by exactly +0.1 on every seed (p = 0); c is a with noise around it; d never ran
    base = [0.50, 0.62, 0.41, 0.70, 0.55]
    rows = []
    for seed, value in enumerate(base):
        rows.append({"method": "a", "seed": seed, "train.lr": 0.01, "test_accuracy": value})
        rows.append({"method": "b", "seed": seed, "train.lr": 0.003, "test_accuracy": value + 0.1})
        rows.append({"method": "c", "seed": seed, "train.lr": 0.01, "test_accuracy": value + (-0.02, 0.03)[seed % 2]})
    _write(tmp_path / "compare.csv", rows)
    tuning = [
        {"method": "a", "train.lr": lr, "validation_accuracy": v, "chosen": lr == 0.01}
        for lr, v in ((0.001, 0.3), (0.003, 0.5), (0.01, 0.6))
    ] + [
        {"method": "b", "train.lr": lr, "validation_accuracy": v, "chosen": lr == 0.003}
        for lr, v in ((0.001, 0.4), (0.003, 0.7), (0.01, 0.2))
    ]
    _write(tmp_path / "tuning.csv", tuning)
    (tmp_path / "compare.md").write_text("table\n\nCommand: `fedlowrank compare --seeds 5`\n")
    return tmp_path


def test_verdicts_follow_the_paired_test():
    assert verdict(None) == "not run"
    assert verdict(paired_comparison([0.6, 0.7, 0.5], [0.5, 0.6, 0.4])) == "reproduces"
    assert verdict(paired_comparison([0.5, 0.6, 0.4], [0.6, 0.7, 0.5])) == "reversed"
    noisy = paired_comparison([0.51, 0.58, 0.47], [0.5, 0.6, 0.45])
    assert noisy.p_value > 0.05 and verdict(noisy) == "same direction, not significant"


def test_report_reads_the_comparison(compare_dir, tmp_path):
    claims = [
        Claim("P1", "b", "a", "b beats a", "metric", "cfg"),
        Claim("P2", "a", "b", "a beats b", "metric", "cfg"),
        Claim("P3", "c", "a", "c beats a", "metric", "cfg"),
        Claim("P4", "d", "a", "d beats a", "metric", "cfg"),
    ]
    text = build_report(compare_dir, claims)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| P")}
    assert "+0.100 [+0.100, +0.100]" in rows["P1"] and rows["P1"].endswith("reproduces |")
    assert rows["P2"].endswith("reversed |")
    assert "not significant" in rows["P3"]
    assert rows["P4"].endswith("not run |")
    assert "a: chosen lr 0.01 is the grid's largest" in text  # the edge of the grid is flagged
    assert "b: chosen lr 0.003 is inside the grid" in text
    assert "`fedlowrank compare --seeds 5`" in text  # the command of the figures


def test_shipped_claims_parse_and_name_registered_methods():
    from strategies.registry import method_names

    claims = load_claims()
    assert len(claims) >= 4
    assert {c.better for c in claims} | {c.worse for c in claims} <= set(method_names())


def test_a_folder_without_a_comparison_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path), "--output", str(tmp_path / "R.md")])
    assert "no compare.csv" in capsys.readouterr().err
