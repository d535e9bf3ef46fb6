"""The resumable sweep helper every experiment driver stands on (``bench bias``, ``sweep privacy``, ...).

A sweep is a list of :class:`Cell` s, each a run of the base config with some keys changed. Every cell's
config is built and checked before anything runs; each cell runs through the in-process simulator into
``<output>/runs/<cell>/``; a cell whose run finished (its ``summary.json`` exists) is not run again, and one
that was interrupted continues from its last finished round, so an interrupted sweep picks up where it
stopped. The tables, CSVs and plots are written from those run folders.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.progress import Reporter
from fedlowrank.report import read_metrics


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its name (the run folder), the keys it changes, and its coordinates for tables."""

    name: str
    overrides: dict[str, Any] = field(hash=False)
    labels: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class CellRun:
    cell: Cell
    run_dir: Path

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)


@dataclass(frozen=True)
class SweepRun:
    """Where and how a sweep runs: its output folder, a progress reporter per run, a callback after each cell."""

    output_dir: Path
    reporter_factory: Callable[[], Reporter] = Reporter
    on_cell: Callable[[int, int, Cell], None] | None = None


def cell_config(base: RunConfig, cell: Cell, output_dir: Path) -> RunConfig:
    flat = base.to_flat()
    flat.update(cell.overrides)
    flat.update({"name": cell.name, "output-dir": str(output_dir / "runs")})
    return RunConfig.from_flat(flat)


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


# What may differ between a cell's saved run and the same cell asked for again (where and how it is written).
NOT_SETTINGS = ("name", "output-dir", "resume", "overwrite")


def _settings(config: RunConfig) -> dict[str, Any]:
    """The flat settings with every method option at its default where not given (a saved run lists them all)."""
    from strategies.registry import option_defaults

    flat = config.to_flat()
    if flat.get("data-dir"):  # the same folder, however it was written
        flat["data-dir"] = os.path.abspath(flat["data-dir"])
    for method, options in option_defaults().items():
        for option, value in options.items():
            flat.setdefault(f"method.{method}.{option}", value)
    return flat


def check_same_settings(run_dir: Path, config: RunConfig) -> None:
    """A cell's folder that holds a run of other settings is never reused (its results would be reported under
    the new ones) nor overwritten: refuse, naming what differs."""
    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        return
    saved, wanted = (_settings(c) for c in (RunConfig.from_toml(saved_path), config))
    differing = sorted(k for k in set(saved) | set(wanted) if k not in NOT_SETTINGS and saved.get(k) != wanted.get(k))
    if differing:
        shown = ", ".join(f"{k} = {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in differing[:5])
        raise ConfigError(
            f"{run_dir} holds a run of other settings ({shown}): its results cannot stand for this cell. Use "
            "another --output folder, or move that run away"
        )


def run_cells(
    base: RunConfig, cells: Sequence[Cell], run: SweepRun, after_cell: Callable[[list[CellRun]], None] | None = None
) -> list[CellRun]:
    """Run every unfinished cell (configs checked first: a typo fails before any run); returns them all."""
    from simulations.run import run_inprocess
    from strategies.registry import resolve_method

    configs = [cell_config(base, cell, run.output_dir) for cell in cells]
    for config in configs:
        resolve_method(config)
        check_same_settings(Path(config.output_dir) / config.name, config)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    done: list[CellRun] = []
    for index, (cell, config) in enumerate(zip(cells, configs, strict=True)):
        run_dir = Path(config.output_dir) / config.name
        if not finished(run_dir):
            # a cell interrupted mid-run continues from its last round
            config.resume = (run_dir / "config.toml").is_file()
            run_inprocess(config, run.reporter_factory())
        done.append(CellRun(cell, run_dir))
        if run.on_cell is not None:
            run.on_cell(index + 1, len(cells), cell)
        if after_cell is not None:
            after_cell(done)  # partial results are usable
    return done


# ---- tables ---------------------------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def mean_std(values: Iterable[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.4f}"
    return f"{statistics.mean(present):.4f} ± {statistics.stdev(present):.4f}"


def grouped(rows: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows by their values of ``keys``, in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[key] for key in keys), []).append(row)
    return groups


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def draw_spread(axis: Any, series: dict[str, list[tuple[float, list[float]]]]) -> None:
    """On ``axis``, one line per series through the mean of each x's values, shaded by their standard deviation."""
    for label, points in series.items():
        kept = [(x, values) for x, values in points if values]
        xs = [x for x, _ in kept]
        means = [statistics.mean(values) for _, values in kept]
        spreads = [statistics.stdev(values) if len(values) > 1 else 0.0 for _, values in kept]
        line = axis.plot(xs, means, marker="o", label=label)[0]
        lows = [m - s for m, s in zip(means, spreads, strict=True)]
        highs = [m + s for m, s in zip(means, spreads, strict=True)]
        axis.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
    axis.grid(alpha=0.3)


def figure(panels: int, width: float = 5.5, height: float = 4.0) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
