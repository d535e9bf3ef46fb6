"""``fedlowrank compare``: methods compared fairly, each tuned on validation data, reported on ≥ 5 seeds.

1. *Tune*: for each method, every point of its grid (the learning rate; FFA-LoRA's α and LoRA-FAIR's λ too) runs a
   short federation (``tune-rounds`` rounds, one seed). Its score is the clients' **validation** accuracy in the
   last round (``client_eval_accuracy``); the test split never enters the choice.
2. *Report*: each method's best setting runs in full on every seed; the final test accuracy is reported as
   mean ± 95 % confidence interval (Student's t), and each method is compared with the reference method (FedIT) by
   a paired t-test over the same seeds (the seed fixes the partition, so pairs share their data).

Both phases stand on the resumable sweep helper: an interrupted comparison continues where it stopped. Written in
the output folder: ``tuning.csv``, ``compare.csv``, ``compare.md`` (table + the command) and ``compare.png``.
"""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.stats import mean_interval, paired_comparison
from simulations import sweep
from strategies.registry import get_method

SELECTION_METRIC = "client_eval_accuracy"  # the clients' validation splits: never the test set
DEFAULT_LRS = (1e-3, 3e-3, 1e-2)
EXTRA_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "ffa": {"lora.alpha": (16, 64)},  # FFA-LoRA trains only B: its paper scales α (and the lr) for that
    "lora-fair": {"method.lora-fair.lambda": (0.01, 0.1)},
}


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def setting_name(setting: dict[str, Any]) -> str:
    """A grid point as a folder-name part, e.g. ``lr-0.01_alpha-64``."""
    return "_".join(f"{_short(k)}-{v:g}" for k, v in setting.items())


def tuning_cells(
    method: str, lrs: list[float], tune_rounds: int, tune_seed: int, lr_key: str = "train.lr"
) -> list[sweep.Cell]:
    """The grid of ``method``: ``lr_key`` (``dp.lr`` when DP-SGD clients train at their own rate) over ``lrs``,
    with the method's extra options."""
    grid = {lr_key: tuple(lrs), **EXTRA_GRIDS.get(method, {})}
    cells = []
    for values in product(*grid.values()):
        setting = dict(zip(grid, values, strict=True))
        name = setting_name(setting)
        overrides = {"strategy": method, "seed": tune_seed, "num-rounds": tune_rounds, **setting}
        cells.append(sweep.Cell(f"tune_{method}_{name}", overrides, {"method": method, **setting}))
    return cells


def validation_score(run: sweep.CellRun) -> float:
    """The last round's validation accuracy of a tuning run (the test metrics in the same rows are ignored)."""
    rows = [row for row in run.metrics() if SELECTION_METRIC in row]
    if not rows:
        raise ConfigError(
            f"tuning run {run.cell.name} has no validation accuracy: tuning needs validation data "
            "(data.validation-fraction > 0)"
        )
    return float(rows[-1][SELECTION_METRIC])


def choose(tuned: list[sweep.CellRun]) -> dict[str, Any]:
    """The best grid point by validation score (ties: the first in grid order)."""
    scored = [(validation_score(run), -index, run) for index, run in enumerate(tuned)]
    best = max(scored, key=lambda item: (item[0], item[1]))[2]
    return {k: v for k, v in best.cell.overrides.items() if k not in ("strategy", "seed", "num-rounds")}


def _within(overrides: dict[str, Any], setting: dict[str, Any]) -> bool:
    return all(overrides.get(key) == value for key, value in setting.items())


def final_cells(method: str, setting: dict[str, Any], seeds: list[int]) -> list[sweep.Cell]:
    """The chosen setting on every seed; the setting is in the name, so a later comparison that chooses another
    (a wider grid) runs new cells instead of reusing runs of the old choice."""
    overrides = {"strategy": method, **setting}
    name = f"final_{method}_{setting_name(setting)}"
    return [sweep.Cell(f"{name}_seed-{seed}", {**overrides, "seed": seed}, {"method": method}) for seed in seeds]


def tune(
    base: RunConfig, method: str, lrs: list[float], tune_rounds: int, seed: int, run: sweep.SweepRun
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``method``'s grid; its best setting by validation accuracy, and one row per grid point."""
    if base.data.validation_fraction <= 0:
        raise ConfigError("tuning needs validation data: set data.validation-fraction > 0 (e.g. 0.1)")
    lr_key = base.dp.lr_setting(base.train)[0]  # tuning train.lr would not move DP-SGD clients set to dp.lr
    tuned = sweep.run_cells(base, tuning_cells(method, lrs, tune_rounds, seed, lr_key), run)
    best = choose(tuned)
    rows = [
        {**r.cell.labels, "validation_accuracy": validation_score(r), "chosen": _within(r.cell.overrides, best)}
        for r in tuned
    ]
    return best, rows


def run_comparison(
    base: RunConfig,
    methods: list[str],
    seeds: list[int],
    run: sweep.SweepRun,
    *,
    lrs: list[float] | None = None,
    tune_rounds: int = 2,
    reference: str = "fedit",
    command: str = "",
) -> list[dict[str, Any]]:
    """Tune each method on validation data, run the winners on every seed, write the outputs; the result rows."""
    names = [get_method(m).name for m in methods]  # a typo fails before any run
    reference = get_method(reference).name
    if len(seeds) < 2:
        raise ConfigError("a comparison needs at least 2 seeds for an interval (5 or more to be convincing)")
    tuning_rows, chosen = [], {}
    for method in names:
        chosen[method], rows = tune(base, method, list(lrs or DEFAULT_LRS), tune_rounds, seeds[0], run)
        tuning_rows += rows
        sweep.write_csv(tuning_rows, run.output_dir / "tuning.csv")
    cells = [cell for method in names for cell in final_cells(method, chosen[method], seeds)]
    finals = sweep.run_cells(base, cells, run)
    rows = [
        {"method": r.cell.labels["method"], "seed": r.cell.overrides["seed"], **chosen[r.cell.labels["method"]],
         "test_accuracy": r.summary().get("test_accuracy"), "test_f1": r.summary().get("test_f1")}
        for r in finals
    ]  # fmt: skip
    write_outputs(rows, chosen, reference, run.output_dir, command)
    return rows


def summary_rows(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Per method: test accuracy mean and 95 % interval; the paired difference to ``reference`` and its p-value."""
    by_method = sweep.grouped(rows, ("method",))
    accuracy = {m: {r["seed"]: r["test_accuracy"] for r in group} for (m,), group in by_method.items()}
    out = []
    for method, per_seed in accuracy.items():
        interval = mean_interval(list(per_seed.values()))
        row = {"method": method, "mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}
        if reference in accuracy and method != reference:
            shared = sorted(set(per_seed) & set(accuracy[reference]))
            paired = paired_comparison([per_seed[s] for s in shared], [accuracy[reference][s] for s in shared])
            row.update(difference=paired.difference.mean, p_value=paired.p_value)
        out.append(row)
    return out


def write_outputs(
    rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], reference: str, output: Path, command: str
) -> None:
    sweep.write_csv(rows, output / "compare.csv")
    summary, table = summary_rows(rows, reference), []
    for row in summary:
        versus = "(reference)" if row["method"] == reference else "-"
        if "difference" in row:
            versus = f"{row['difference']:+.4f} (p = {row['p_value']:.3g})"
        interval = "-" if math.isnan(row["low"]) else f"[{row['low']:.4f}, {row['high']:.4f}]"
        setting = ", ".join(f"{k} = {v:g}" for k, v in chosen[row["method"]].items())
        table.append([row["method"], f"{row['mean']:.4f}", interval, row["n"], versus, setting])
    header = ["method", "test accuracy", "95 % CI", "seeds", f"paired Δ vs {reference}", "tuned on validation"]
    text = "Final test accuracy, each method at its best validation setting\n\n" + sweep.markdown_table(header, table)
    (output / "compare.md").write_text(text + (f"\nCommand: `{command}`\n" if command else ""))
    plot_comparison(summary, output / "compare.png")


def plot_comparison(summary: list[dict[str, Any]], path: Path) -> None:
    fig, (axis,) = sweep.figure(1, width=max(5.0, 1.1 * len(summary)))
    means = [row["mean"] for row in summary]
    errors = [0.0 if math.isnan(row["low"]) else row["high"] - row["mean"] for row in summary]
    axis.bar([row["method"] for row in summary], means, yerr=errors, capsize=4, alpha=0.8)
    axis.set_ylabel("test accuracy (mean, 95 % CI over seeds)")
    axis.grid(axis="y", alpha=0.3)
    sweep.save_figure(fig, path)
