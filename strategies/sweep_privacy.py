"""``fedlowrank sweep privacy``: accuracy against the sample-level privacy budget, per strategy.

Runs strategies x ε x seeds (ε = ``inf`` is the non-private reference: no DP-SGD at all) through the
in-process simulator and writes, in the output folder,
- ``privacy.csv``: one row per cell (final test accuracy and F1, the largest ε any client spent, σ);
- ``privacy.md``: accuracy mean ± std over seeds, one row per strategy, one column per ε;
- ``privacy.png``: accuracy against ε, one line per strategy with its seed spread.
Finished cells (a ``summary.json``) are not re-run, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.progress import Reporter
from fedlowrank.report import read_metrics
from strategies.registry import canonical_name
from strategies.simulation import run_inprocess


@dataclass(frozen=True)
class PrivacyCell:
    strategy: str
    epsilon: float  # math.inf: no DP
    seed: int

    @property
    def label(self) -> str:
        return "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"

    @property
    def name(self) -> str:
        return f"{self.strategy}_eps-{self.label}_seed-{self.seed}"


def parse_epsilons(text: str) -> list[float]:
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value = math.inf if part.lower() in ("inf", "∞", "none") else float(part)
        if not value > 0:
            raise ConfigError(f"--epsilons: every ε must be > 0 or 'inf', got {part!r}")
        values.append(value)
    if not values:
        raise ConfigError("--epsilons: give at least one value, e.g. 1,3,6,inf")
    return values


def cell_config(base: RunConfig, cell: PrivacyCell, output_dir: Path) -> RunConfig:
    flat = base.to_flat()
    flat.update(
        {
            "strategy": cell.strategy,
            "seed": cell.seed,
            "dp.epsilon": 0.0 if math.isinf(cell.epsilon) else cell.epsilon,
            "name": cell.name,
            "output-dir": str(output_dir / "runs"),
        }
    )
    return RunConfig.from_flat(flat)


def run_privacy_sweep(
    base: RunConfig,
    strategies: list[str],
    epsilons: list[float],
    seeds: list[int],
    output_dir: Path,
    reporter_factory: Callable[[], Reporter] = Reporter,
    on_cell: Callable[[int, int, PrivacyCell], None] | None = None,
) -> list[dict[str, Any]]:
    strategies = [canonical_name(s) for s in strategies]  # a typo fails before any run
    cells = [PrivacyCell(*values) for values in product(strategies, epsilons, seeds)]
    configs = [cell_config(base, cell, output_dir) for cell in cells]  # every config validated up front
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (cell, config) in enumerate(zip(cells, configs, strict=True)):
        run_dir = Path(config.output_dir) / config.name
        if not (run_dir / "summary.json").is_file():
            run_inprocess(config, reporter_factory())
        rows.append(_cell_row(cell, run_dir))
        if on_cell is not None:
            on_cell(index + 1, len(cells), cell)
        write_outputs(rows, output_dir)  # after every cell: partial results are usable
    return rows


def _cell_row(cell: PrivacyCell, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    sigmas = [v for row in metrics for v in (row.get("dp_noise_multiplier_per_client") or {}).values()]
    return {
        "strategy": cell.strategy,
        "epsilon": cell.label,
        "seed": cell.seed,
        "test_accuracy": summary.get("test_accuracy"),
        "test_f1": summary.get("test_f1"),
        "epsilon_spent_max": summary.get("dp_epsilon_max"),
        "noise_multiplier_mean": statistics.mean(sigmas) if sigmas else None,
        "rounds_completed": sum(1 for row in metrics if "stopped" not in row),
        "wall_time": summary.get("wall_time"),
    }


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _epsilon_order(label: str) -> float:
    return math.inf if label == "inf" else float(label)


def write_outputs(rows: list[dict[str, Any]], output_dir: Path) -> None:
    with (output_dir / "privacy.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    strategies = list(dict.fromkeys(row["strategy"] for row in rows))
    labels = sorted({row["epsilon"] for row in rows}, key=_epsilon_order)
    header = "| strategy | " + " | ".join(f"ε = {'∞ (no DP)' if lb == 'inf' else lb}" for lb in labels) + " |"
    lines = [header, "|---|" + "---|" * len(labels)]
    for strategy in strategies:
        cells = []
        for label in labels:
            members = [r for r in rows if r["strategy"] == strategy and r["epsilon"] == label]
            cells.append(f"{_mean_std([m['test_accuracy'] for m in members])} (n={len(members)})" if members else "-")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    (output_dir / "privacy.md").write_text("test accuracy, mean ± std over seeds\n\n" + "\n".join(lines) + "\n")
    plot_privacy(rows, output_dir / "privacy.png")


def plot_privacy(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({row["epsilon"] for row in rows}, key=_epsilon_order)
    finite = [float(lb) for lb in labels if lb != "inf"]
    # ∞ sits one log-step to the right of the largest finite ε, labelled as such
    inf_x = (max(finite) * 2.5) if finite else 1.0
    x_of = {lb: (inf_x if lb == "inf" else float(lb)) for lb in labels}
    fig, axis = plt.subplots(figsize=(5.5, 4))
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        xs, means, lows, highs = [], [], [], []
        for label in labels:
            values = [
                r["test_accuracy"]
                for r in rows
                if r["strategy"] == strategy and r["epsilon"] == label and r["test_accuracy"] is not None
            ]
            if not values:
                continue
            mean = statistics.mean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            xs.append(x_of[label])
            means.append(mean)
            lows.append(mean - spread)
            highs.append(mean + spread)
        line = axis.plot(xs, means, marker="o", label=strategy)[0]
        axis.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
    axis.set_xscale("log")
    axis.set_xticks([x_of[lb] for lb in labels], ["∞" if lb == "inf" else lb for lb in labels])
    axis.minorticks_off()
    axis.set_xlabel("sample-level ε per client (δ = 1e-5)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
