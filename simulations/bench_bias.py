"""``fedlowrank bench bias``: aggregation bias and accuracy of the strategies across heterogeneity levels.

Runs strategies x heterogeneity (Dirichlet α values and IID) x local steps x seeds on the configured task
(default: MiniLM + TREC, 10 clients) on the resumable sweep helper, then writes
- ``bias.csv``: one row per cell and round (bias_rel mean/max, round-normalised bias, FedSA's gap, accuracy);
- ``bias.png``: bias per round, one line per strategy, one panel per heterogeneity level and local steps;
- ``accuracy.md`` / ``accuracy.csv``: final test accuracy per cell, mean ± std over seeds;
- ``bias_summary.md``: mean bias per strategy and heterogeneity.
"""

from __future__ import annotations

import statistics
from itertools import product
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig
from simulations import sweep
from strategies.registry import get_method

ROW_KEYS = (
    "bias_rel_mean",
    "bias_rel_max",
    "bias_round_rel_mean",
    "personalization_gap",
    "test_accuracy",
    "client_eval_accuracy",
    "bytes_up",
    "bytes_down",
)


def bias_cell(strategy: str, heterogeneity: str, local_steps: int, seed: int) -> sweep.Cell:
    """``heterogeneity``: "iid" or a Dirichlet α as text."""
    overrides: dict[str, Any] = {"strategy": strategy, "seed": seed, "train.local-steps": local_steps}
    if heterogeneity == "iid":
        overrides["data.partitioner"] = "iid"
    else:
        try:
            overrides.update({"data.partitioner": "dirichlet", "data.dirichlet-alpha": float(heterogeneity)})
        except ValueError:
            raise ConfigError(f"heterogeneity must be 'iid' or a Dirichlet α, got {heterogeneity!r}") from None
    labels = {"strategy": strategy, "heterogeneity": heterogeneity, "local_steps": local_steps, "seed": seed}
    return sweep.Cell(f"{strategy}_h-{heterogeneity}_steps-{local_steps}_seed-{seed}", overrides, labels)


def run_bias_benchmark(
    base: RunConfig, strategies: list[str], levels: list[str], steps: list[int], seeds: list[int], run: sweep.SweepRun
) -> list[dict[str, Any]]:
    """``levels``: heterogeneity levels ("iid" or Dirichlet α values); ``steps``: local steps per round."""
    names = [get_method(s).name for s in strategies]
    cells = [bias_cell(*values) for values in product(names, levels, steps, seeds)]
    runs = sweep.run_cells(base, cells, run)
    rows = [
        {**cell_run.cell.labels, "round": metrics["round"], **{key: metrics.get(key) for key in ROW_KEYS}}
        for cell_run in runs
        for metrics in cell_run.metrics()
    ]
    write_outputs(rows, run.output_dir)
    return rows


def write_outputs(rows: list[dict[str, Any]], output_dir: Path) -> None:
    sweep.write_csv(rows, output_dir / "bias.csv")
    last_round = max(row["round"] for row in rows)
    finals = sweep.grouped(
        (row for row in rows if row["round"] == last_round), ("strategy", "heterogeneity", "local_steps")
    )
    accuracy_rows = [
        {
            "strategy": strategy,
            "heterogeneity": level,
            "local_steps": steps,
            "seeds": len(members),
            "test_accuracy": sweep.mean_std(m["test_accuracy"] for m in members),
            "client_eval_accuracy": sweep.mean_std(m["client_eval_accuracy"] for m in members),
        }
        for (strategy, level, steps), members in finals.items()
    ]
    header = ["strategy", "heterogeneity", "local steps", "seeds", "test accuracy", "client val accuracy"]
    (output_dir / "accuracy.md").write_text(sweep.markdown_table(header, [list(r.values()) for r in accuracy_rows]))
    sweep.write_csv(accuracy_rows, output_dir / "accuracy.csv")
    (output_dir / "bias_summary.md").write_text(_bias_summary(rows))
    plot_bias(rows, output_dir / "bias.png")


def _bias_summary(rows: list[dict[str, Any]]) -> str:
    """Mean bias over all rounds and seeds per strategy x heterogeneity (FedSA: its personalisation gap)."""
    levels = sorted({row["heterogeneity"] for row in rows}, key=lambda x: (x == "iid", float(x) if x != "iid" else 0))
    by_cell = sweep.grouped(rows, ("strategy", "heterogeneity"))
    table = []
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        cells = []
        for level in levels:
            members = by_cell.get((strategy, level), [])
            biases = [r["bias_rel_mean"] for r in members if r["bias_rel_mean"] is not None]
            gaps = [r["personalization_gap"] for r in members if r["personalization_gap"] is not None]
            if biases:
                cells.append(f"{statistics.mean(biases):.3e}")
            else:
                cells.append(f"gap {statistics.mean(gaps):.3e}" if gaps else "-")
        table.append([strategy, *cells])
    return sweep.markdown_table(["strategy", *(f"bias_rel {level}" for level in levels)], table)


def plot_bias(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys((row["heterogeneity"], row["local_steps"]) for row in rows))
    fig, axes = sweep.figure(len(panels), width=4.2, height=3.8)
    for axis, (level, steps) in zip(axes, panels, strict=True):
        series = {}
        for (strategy,), members in sweep.grouped(
            (r for r in rows if (r["heterogeneity"], r["local_steps"]) == (level, steps)), ("strategy",)
        ).items():
            per_round = sweep.grouped((m for m in members if m["bias_rel_mean"] is not None), ("round",))
            if per_round:
                series[strategy] = [
                    (r, [m["bias_rel_mean"] for m in per_round[(r,)]]) for r in sorted(k[0] for k in per_round)
                ]
        sweep.draw_spread(axis, series)
        # symlog keeps the exact zeros of FFA / FedSVD / FedEx / FLoRA visible beside FedIT
        axis.set_yscale("symlog", linthresh=1e-6)
        work = f"{steps} local steps" if steps else "local epochs"
        axis.set_title(f"{'IID' if level == 'iid' else 'Dirichlet α=' + level}, {work}")
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("bias_rel (mean over layers)")
    axes[-1].legend(fontsize=8)
    sweep.save_figure(fig, path)
