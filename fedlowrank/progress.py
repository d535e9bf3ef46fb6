"""Progress reporting for long runs: a plain logger and a rich console view (progress bar + round table)."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

log = logging.getLogger("fedlowrank")

# Columns of the per-round table: (metrics.jsonl key, header, format).
ROUND_COLUMNS = (
    ("round", "round", "{:d}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_accuracy", "test acc", "{:.2%}"),
    ("test_f1", "test F1", "{:.3f}"),
    ("test_perplexity", "test ppl", "{:.2f}"),
    ("test_exact_match", "test EM", "{:.2%}"),
    ("client_eval_accuracy", "client val acc", "{:.2%}"),
    ("dp_epsilon_max", "max ε", "{:.2f}"),
    ("bytes_down", "MB down", "{:.2f}"),
    ("bytes_up", "MB up", "{:.2f}"),
    ("wall_time", "wall s", "{:.1f}"),
)


def format_cell(key: str, fmt: str, row: dict[str, Any]) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key.startswith("bytes_"):
        value = value / 1e6
    return fmt.format(value)


class Reporter:
    """Hooks the server loop calls; the default logs one line per round."""

    def start(self, title: str, num_rounds: int) -> None:
        log.info("%s: %d rounds", title, num_rounds)

    def round_started(self, server_round: int, num_clients: int) -> None:
        log.info("round %d: training %d clients", server_round, num_clients)

    def client_finished(self, count: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        log.warning(text)

    def round_finished(self, row: dict[str, Any]) -> None:
        log.info(" | ".join(f"{h}={format_cell(k, f, row)}" for k, h, f in ROUND_COLUMNS if k in row))

    def finish(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        log.info("finished: %s", summary)


class RichReporter(Reporter):
    """A live progress bar over rounds and clients, a line per round, and the full table at the end."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.rounds_task = None
        self.clients_task = None

    def start(self, title: str, num_rounds: int) -> None:
        self.console.print(f"[bold cyan]{title}")
        self.progress.start()
        self.rounds_task = self.progress.add_task("rounds", total=num_rounds)
        self.clients_task = self.progress.add_task("clients", total=1, visible=False)

    def round_started(self, server_round: int, num_clients: int) -> None:
        self.progress.update(
            self.clients_task,
            description=f"round {server_round}: clients",
            total=num_clients,
            completed=0,
            visible=True,
        )

    def client_finished(self, count: int = 1) -> None:
        self.progress.advance(self.clients_task, count)

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]{text}")

    def round_finished(self, row: dict[str, Any]) -> None:
        self.progress.advance(self.rounds_task)
        self.progress.console.print(
            "  ".join(f"{h} [bold]{format_cell(k, f, row)}[/]" for k, h, f in ROUND_COLUMNS if row.get(k) is not None)
        )

    def finish(self, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        self.progress.stop()
        table = Table(title="per-round results")
        # the columns this run has (a causal LM has perplexity, not F1; a run without DP no ε)
        columns = [column for column in ROUND_COLUMNS if any(row.get(column[0]) is not None for row in rows)]
        for _, header, _ in columns:
            table.add_column(header, justify="right")
        for row in rows:
            table.add_row(*(format_cell(k, f, row) for k, _, f in columns))
        self.console.print(table)
        for key, value in summary.items():
            self.console.print(f"[bold]{key}[/]: {value}")
