"""``fedlowrank sweep privacy``: accuracy against the sample-level privacy budget, per strategy.

Runs strategies x ε x seeds (ε = ``inf`` is the non-private reference: no DP-SGD at all) on the resumable sweep
helper and writes, in the output folder,
- ``privacy.csv``: one row per cell (final test accuracy and F1, the largest ε any client spent, σ);
- ``privacy.md``: accuracy mean ± std over seeds, one row per strategy, one column per ε, each strategy's own
  settings, and the command that made it;
- ``privacy.png``: accuracy against ε, one line per strategy with its seed spread.

Methods differ in what they train (FFA-LoRA and FedSVD train B only), so each may run at its own settings, tuned
on validation data (``fedlowrank tune``): ``--method-set ffa:lora.alpha=64`` changes that key in FFA-LoRA's cells
only. The cell folders keep their names; a folder holding a run of other settings is refused, never reused.
"""

from __future__ import annotations

import math
import statistics
from itertools import product
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig, parse_overrides
from simulations import sweep
from strategies.registry import get_method


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


def epsilon_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def parse_method_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["ffa:lora.alpha=64", "ffa:dp.lr=8"]`` -> ``{"ffa": {"lora.alpha": 64, "dp.lr": 8}}`` (canonical names)."""
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, assignment = item.partition(":")
        if not sep or "=" not in assignment:
            raise ConfigError(f"--method-set expects METHOD:KEY=VALUE (e.g. ffa:lora.alpha=64), got {item!r}")
        name = get_method(method.strip()).name
        settings.setdefault(name, {}).update(parse_overrides([assignment]))
    return settings


def privacy_cell(strategy: str, epsilon: float, seed: int, settings: dict[str, Any] | None = None) -> sweep.Cell:
    label = epsilon_label(epsilon)
    overrides = {**(settings or {}), "strategy": strategy, "seed": seed}
    overrides["dp.epsilon"] = 0.0 if math.isinf(epsilon) else epsilon
    return sweep.Cell(
        f"{strategy}_eps-{label}_seed-{seed}", overrides, {"strategy": strategy, "epsilon": label, "seed": seed}
    )


def run_privacy_sweep(
    base: RunConfig,
    strategies: list[str],
    epsilons: list[float],
    seeds: list[int],
    run: sweep.SweepRun,
    method_settings: dict[str, dict[str, Any]] | None = None,
    command: str = "",
) -> list[dict[str, Any]]:
    names = [get_method(s).name for s in strategies]  # a typo fails before any run
    settings = method_settings or {}
    if unused := sorted(set(settings) - set(names)):
        raise ConfigError(f"--method-set names {', '.join(unused)}, which this sweep does not run ({', '.join(names)})")
    cells = [
        privacy_cell(strategy, epsilon, seed, settings.get(strategy))
        for strategy, epsilon, seed in product(names, epsilons, seeds)
    ]

    def write(done: list[sweep.CellRun]) -> None:
        write_outputs([_cell_row(r) for r in done], run.output_dir, settings, command)

    runs = sweep.run_cells(base, cells, run, write)
    return [_cell_row(cell_run) for cell_run in runs]


def _cell_row(run: sweep.CellRun) -> dict[str, Any]:
    summary, metrics = run.summary(), run.metrics()
    sigmas = [v for row in metrics for v in (row.get("dp_noise_multiplier_per_client") or {}).values()]
    return {
        **run.cell.labels,
        "test_accuracy": summary.get("test_accuracy"),
        "test_f1": summary.get("test_f1"),
        "epsilon_spent_max": summary.get("dp_epsilon_max"),
        "noise_multiplier_mean": statistics.mean(sigmas) if sigmas else None,
        "rounds_completed": sum(1 for row in metrics if "stopped" not in row),
        "wall_time": summary.get("wall_time"),
    }


def _epsilon_order(label: str) -> float:
    return math.inf if label == "inf" else float(label)


def write_outputs(
    rows: list[dict[str, Any]],
    output_dir: Path,
    method_settings: dict[str, dict[str, Any]] | None = None,
    command: str = "",
) -> None:
    sweep.write_csv(rows, output_dir / "privacy.csv")
    labels = sorted({row["epsilon"] for row in rows}, key=_epsilon_order)
    cells = sweep.grouped(rows, ("strategy", "epsilon"))
    table = []
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        members = [cells.get((strategy, label), []) for label in labels]
        table.append(
            [
                strategy,
                *(f"{sweep.mean_std(m['test_accuracy'] for m in ms)} (n={len(ms)})" if ms else "-" for ms in members),
            ]
        )
    header = ["strategy", *(f"ε = {'∞ (no DP)' if label == 'inf' else label}" for label in labels)]
    settings = method_settings or {}
    own = [
        f"- {strategy}: " + ", ".join(f"`{key} = {value}`" for key, value in settings[strategy].items())
        for strategy in dict.fromkeys(row["strategy"] for row in rows)
        if settings.get(strategy)
    ]
    text = "test accuracy, mean ± std over seeds\n\n" + sweep.markdown_table(header, table)
    if own:
        text += "\nEach method's own settings (the rest is the config's):\n\n" + "\n".join(own) + "\n"
    if command:
        text += f"\nMade by:\n\n    {command}\n"
    (output_dir / "privacy.md").write_text(text)
    plot_privacy(rows, output_dir / "privacy.png")


def plot_privacy(rows: list[dict[str, Any]], path: Path) -> None:
    labels = sorted({row["epsilon"] for row in rows}, key=_epsilon_order)
    finite = [float(label) for label in labels if label != "inf"]
    # ∞ sits one log-step to the right of the largest finite ε, labelled as such
    inf_x = (max(finite) * 2.5) if finite else 1.0
    x_of = {label: (inf_x if label == "inf" else float(label)) for label in labels}
    cells = sweep.grouped((r for r in rows if r["test_accuracy"] is not None), ("strategy", "epsilon"))
    series = {
        strategy: [(x_of[label], [m["test_accuracy"] for m in cells.get((strategy, label), [])]) for label in labels]
        for strategy in dict.fromkeys(row["strategy"] for row in rows)
    }
    fig, (axis,) = sweep.figure(1)
    sweep.draw_spread(axis, series)
    axis.set_xscale("log")
    axis.set_xticks([x_of[label] for label in labels], ["∞" if label == "inf" else label for label in labels])
    axis.minorticks_off()
    axis.set_xlabel("sample-level ε per client (δ = 1e-5)")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.legend()
    sweep.save_figure(fig, path)
