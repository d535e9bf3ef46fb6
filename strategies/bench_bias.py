"""``fedlowrank bench bias``: aggregation bias and accuracy of the strategies across heterogeneity levels.

Runs strategies x heterogeneity (Dirichlet α values and IID) x local steps x seeds on the configured task
(default: MiniLM + TREC, 10 clients) through the in-process simulator, then writes
- ``bias.csv``: one row per cell and round (bias_rel mean/max, round-normalised bias, FedSA's gap, accuracy);
- ``bias.png``: bias per round, one line per strategy, one panel per heterogeneity level and local steps;
- ``accuracy.md`` / ``accuracy.csv``: final test accuracy per cell, mean ± std over seeds;
- ``bias_summary.md``: mean bias per strategy and heterogeneity.
Finished cells (a complete ``metrics.jsonl``) are not re-run.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from fedlowrank.config import RunConfig
from fedlowrank.progress import Reporter
from fedlowrank.report import read_metrics
from strategies.registry import canonical_name
from strategies.simulation import run_inprocess


@dataclass(frozen=True)
class Cell:
    strategy: str
    heterogeneity: str  # "iid" or a Dirichlet α as text
    local_steps: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.strategy}_h-{self.heterogeneity}_steps-{self.local_steps}_seed-{self.seed}"


def cell_config(base: RunConfig, cell: Cell, output_dir: Path) -> RunConfig:
    flat = base.to_flat()
    flat.update(
        {
            "strategy": cell.strategy,
            "seed": cell.seed,
            "train.local-steps": cell.local_steps,
            "name": cell.name,
            "output-dir": str(output_dir / "runs"),
        }
    )
    if cell.heterogeneity == "iid":
        flat["data.partitioner"] = "iid"
    else:
        flat["data.partitioner"] = "dirichlet"
        flat["data.dirichlet-alpha"] = float(cell.heterogeneity)
    return RunConfig.from_flat(flat)


def _finished(run_dir: Path, rounds: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and len(read_metrics(run_dir)) == rounds and (run_dir / "summary.json").is_file()


def run_bias_benchmark(
    base: RunConfig,
    strategies: list[str],
    heterogeneity: list[str],
    local_steps: list[int],
    seeds: list[int],
    output_dir: Path,
    reporter_factory=Reporter,
    on_cell=None,
) -> list[dict[str, Any]]:
    strategies = [canonical_name(s) for s in strategies]
    for level in heterogeneity:
        if level != "iid":
            float(level)  # a bad level fails here, before any run
    output_dir.mkdir(parents=True, exist_ok=True)
    cells = [Cell(*values) for values in product(strategies, heterogeneity, local_steps, seeds)]
    rows: list[dict[str, Any]] = []
    for index, cell in enumerate(cells):
        config = cell_config(base, cell, output_dir)
        run_dir = Path(config.output_dir) / config.name
        if not _finished(run_dir, config.num_rounds):
            run_inprocess(config, reporter_factory())
        for metrics in read_metrics(run_dir):
            rows.append(
                {
                    "strategy": cell.strategy,
                    "heterogeneity": cell.heterogeneity,
                    "local_steps": cell.local_steps,
                    "seed": cell.seed,
                    "round": metrics["round"],
                    "bias_rel_mean": metrics.get("bias_rel_mean"),
                    "bias_rel_max": metrics.get("bias_rel_max"),
                    "bias_round_rel_mean": metrics.get("bias_round_rel_mean"),
                    "personalization_gap": metrics.get("personalization_gap"),
                    "test_accuracy": metrics.get("test_accuracy"),
                    "client_eval_accuracy": metrics.get("client_eval_accuracy"),
                    "bytes_up": metrics.get("bytes_up"),
                    "bytes_down": metrics.get("bytes_down"),
                }
            )
        if on_cell is not None:
            on_cell(index + 1, len(cells), cell)
    write_outputs(rows, output_dir)
    return rows


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_outputs(rows: list[dict[str, Any]], output_dir: Path) -> None:
    with (output_dir / "bias.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    last_round = max(row["round"] for row in rows)
    finals = [row for row in rows if row["round"] == last_round]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in finals:
        groups.setdefault((row["strategy"], row["heterogeneity"], row["local_steps"]), []).append(row)
    accuracy_rows = []
    lines = [
        "| strategy | heterogeneity | local steps | seeds | test accuracy | client val accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for (strategy, level, steps), members in groups.items():
        acc = _mean_std([m["test_accuracy"] for m in members])
        val = _mean_std([m["client_eval_accuracy"] for m in members])
        lines.append(f"| {strategy} | {level} | {steps} | {len(members)} | {acc} | {val} |")
        accuracy_rows.append(
            {
                "strategy": strategy,
                "heterogeneity": level,
                "local_steps": steps,
                "seeds": len(members),
                "test_accuracy": acc,
                "client_eval_accuracy": val,
            }
        )
    (output_dir / "accuracy.md").write_text("\n".join(lines) + "\n")
    with (output_dir / "accuracy.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(accuracy_rows[0]))
        writer.writeheader()
        writer.writerows(accuracy_rows)
    # bias over all rounds and seeds, per strategy x heterogeneity
    levels = sorted({row["heterogeneity"] for row in rows}, key=lambda x: (x == "iid", float(x) if x != "iid" else 0))
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    table = ["| strategy | " + " | ".join(f"bias_rel {lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for strategy in strategies:
        cells = []
        for level in levels:
            values = [
                r["bias_rel_mean"]
                for r in rows
                if r["strategy"] == strategy and r["heterogeneity"] == level and r["bias_rel_mean"] is not None
            ]
            gaps = [
                r["personalization_gap"]
                for r in rows
                if r["strategy"] == strategy and r["heterogeneity"] == level and r["personalization_gap"] is not None
            ]
            if values:
                cells.append(f"{statistics.mean(values):.3e}")
            elif gaps:
                cells.append(f"gap {statistics.mean(gaps):.3e}")
            else:
                cells.append("-")
        table.append(f"| {strategy} | " + " | ".join(cells) + " |")
    (output_dir / "bias_summary.md").write_text("\n".join(table) + "\n")
    plot_bias(rows, output_dir / "bias.png")


def plot_bias(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys((row["heterogeneity"], row["local_steps"]) for row in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (level, steps) in zip(axes[0], panels, strict=True):
        for strategy in dict.fromkeys(row["strategy"] for row in rows):
            series: dict[int, list[float]] = {}
            for row in rows:
                if (row["strategy"], row["heterogeneity"], row["local_steps"]) == (strategy, level, steps) and row[
                    "bias_rel_mean"
                ] is not None:
                    series.setdefault(row["round"], []).append(row["bias_rel_mean"])
            if series:
                rounds = sorted(series)
                # symlog keeps the exact zeros of FFA / FedSVD / FedEx / FLoRA visible beside FedIT
                axis.plot(rounds, [statistics.mean(series[r]) for r in rounds], marker="o", label=strategy)
        axis.set_yscale("symlog", linthresh=1e-6)
        work = f"{steps} local steps" if steps else "local epochs"
        axis.set_title(f"{'IID' if level == 'iid' else 'Dirichlet α=' + level}, {work}")
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("bias_rel (mean over layers)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
