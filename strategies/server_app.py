"""The fedlowrank ServerApp (Flower Message API) and its round loop.

``run_server`` drives the run's ``LoRAStrategy`` over any Flower ``Grid`` (Flower's simulation, real
SuperNodes, or the in-process grids of ``simulations/``) in the shape of Flower's ``Strategy.start``:
configure → train → aggregate → evaluate, round after round. What a run records beside the strategy's own
account of a round comes from small hooks chosen once: the bytes on the wire, the per-client ε ledger, the
evaluation (the server's global model, or the clients' own models for a personalised method) and the run
recorder (``runs/<name>/``). No method is named here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlowrank.adapters import count_parameters
from fedlowrank.checkpoint import crash_point, load_checkpoint, save_checkpoint
from fedlowrank.config import RunConfig
from fedlowrank.diagnostics import learning_warning
from fedlowrank.progress import Reporter
from fedlowrank.protocol import Refusal, TrainReply
from fedlowrank.protocol import flower as wire
from fedlowrank.report import RunRecorder, check_run_dir, plot_run, read_metrics, summary_scores
from fedlowrank.runtime import Workspace, get_workspace
from strategies.cohorts import CohortGrid
from strategies.registry import resolve_method
from strategies.replies import send_and_collect
from strategies.strategy import FederationError, LoRAStrategy, TrainRoundResult, build_strategy

__all__ = ["FederationError", "app", "make_server_app", "run_server"]


class Traffic:
    """Bytes as serialized: each train message's broadcast down, each reply's upload up."""

    def __init__(self) -> None:
        self.down_total = self.up_total = 0

    def count(self, messages: list[Message], replies: list[Message]) -> dict[str, int]:
        answered = [reply for reply in replies if not reply.has_error()]
        down = 0
        sizes: dict[int, int] = {}  # a round's instructions share one broadcast record: counted once, sent to each
        for record in map(wire.message_arrays, messages):
            if id(record) not in sizes:
                sizes[id(record)] = wire.record_bytes(record)
            down += sizes[id(record)]
        up = sum(wire.record_bytes(wire.message_arrays(r)) for r in answered)
        self.down_total += down
        self.up_total += up
        return {
            "bytes_down": down,
            "bytes_up": up,
            "bytes_down_per_client": down // max(len(messages), 1),
            "bytes_up_per_client": up // max(len(answered), 1),
        }


class EpsilonLedger:
    """The server's per-client record of cumulative sample-level ε (as each client last reported it)."""

    def __init__(self) -> None:
        self.epsilon: dict[str, float] = {}
        self.noise: dict[str, float] = {}

    def update(self, replies: list[TrainReply | Refusal]) -> dict[str, Any]:
        refused_now = []
        for reply in replies:
            client = str(reply.partition_id)
            if isinstance(reply, Refusal):
                self.epsilon[client] = reply.epsilon
                refused_now.append(client)
            elif reply.privacy is not None:
                self.epsilon[client] = reply.privacy.epsilon
                self.noise[client] = reply.privacy.noise_multiplier
        return {
            "dp_epsilon_max": max(self.epsilon.values(), default=0.0),
            "dp_epsilon_per_client": dict(sorted(self.epsilon.items(), key=lambda item: int(item[0]))),
            "dp_noise_multiplier_per_client": dict(sorted(self.noise.items(), key=lambda item: int(item[0]))),
            "dp_refused_clients": refused_now,
        }


class GlobalEvaluation:
    """The server scores the global model (adapter plus folded residuals) on the global test set."""

    def __init__(self, workspace: Workspace, every: int) -> None:
        self.workspace, self.every = workspace, every

    def clients_score_test_set(self, last_round: bool) -> bool:
        return False

    def server_metrics(self, server_round: int, last_round: bool, strategy: LoRAStrategy) -> dict[str, Any]:
        if server_round % self.every and not last_round:
            return {}
        self.workspace.load_global(strategy.global_model_state())
        generate = self.workspace.generation_due(server_round, last_round)
        return self.workspace.score("test", generate=generate).as_dict("test_")


class PersonalizedEvaluation:
    """No global model: in the last round each client scores its own model on the global test set."""

    def clients_score_test_set(self, last_round: bool) -> bool:
        return last_round

    def server_metrics(self, server_round: int, last_round: bool, strategy: LoRAStrategy) -> dict[str, Any]:
        return {"test_eval": "personalized-mean"}


def cohort_grid(grid: Grid, config: RunConfig) -> tuple[Grid, Callable[[], dict[str, Any]]]:
    """The grid the strategy addresses (virtual clients on cohort nodes, when the run has them) and what each
    round's row says about its nodes."""
    if not config.cohort_nodes:
        return grid, dict
    cohorts = CohortGrid(grid, config.num_clients, config.cohort_nodes)
    return cohorts, cohorts.round_report


class FederatedRun:
    """One run of ``config`` over ``grid``: the strategy, the hooks, and the loop's steps.

    After every round the run is saved to disk: its metrics row, the global adapter (``adapter/``, each file
    replaced atomically) and a checkpoint (``checkpoint.safetensors``) with everything needed to go on. With
    ``resume`` a run continues from its checkpoint; clients find their own state as it was after the last round
    they trained before the round being run (versioned client state), so a resumed run ends where an
    uninterrupted one would.
    """

    def __init__(self, grid: Grid, config: RunConfig, reporter: Reporter) -> None:
        self.config, self.reporter = config, reporter
        self.grid, self.node_report = cohort_grid(grid, config)
        check_run_dir(config)  # before anything loads: a bad output path or an existing run fails at once
        method = resolve_method(config)
        self.workspace = get_workspace(config)
        _ = self.workspace.client_splits  # partition now: data errors surface before any training
        training_set = len(self.workspace.task.train)
        self.strategy = build_strategy(config, self.workspace.initial_state, method, max_examples=training_set)
        self.traffic = Traffic()
        self.ledger = EpsilonLedger() if config.dp.sample_level else None
        # Who has trained in this run, told to clients of runs that keep client state (a DP accountant, an own
        # B): one of them that finds none has lost it, and fails rather than start it over
        self.trained: set[int] = set()
        self.keeps_client_state = config.dp.sample_level or bool(self.strategy.spec.kept_roles())
        personalized = self.strategy.spec.personalized
        self.evaluation = (
            PersonalizedEvaluation() if personalized else GlobalEvaluation(self.workspace, config.server_eval_every)
        )
        self.recorder = RunRecorder.create(config, run_key=True)
        self.start_round, self.stopped = self._restore() if config.resume else (1, "")
        self.arrays = self.strategy.broadcast_record()
        self.timeout = config.server.train_timeout or None

    def _restore(self) -> tuple[int, str]:
        """Continue from the checkpoint (a run killed before its first one starts over)."""
        saved = load_checkpoint(self.recorder.run_dir)
        if saved is None:
            self.recorder.keep_rounds(0)
            return 1, ""
        tensors, meta = saved
        self.strategy.load_state_dict(tensors)
        # a checkpoint from before this record: under DP-SGD the ledger names the clients that spent budget
        ledger = meta.get("ledger") or {"epsilon": {}}
        self.trained = set(meta.get("trained", [int(c) for c, eps in ledger["epsilon"].items() if (eps or 0) > 0]))
        self.traffic.down_total, self.traffic.up_total = meta["traffic"]
        if self.ledger is not None:
            self.ledger.epsilon, self.ledger.noise = meta["ledger"]["epsilon"], meta["ledger"]["noise"]
        self.recorder.keep_rounds(meta["round"])
        self.reporter.note(f"resuming {self.recorder.run_dir} after round {meta['round']}")
        return meta["round"] + 1, meta.get("stopped", "")

    def _save(self, server_round: int, stopped: str = "") -> None:
        meta = {
            "round": server_round,
            "stopped": stopped,
            "trained": sorted(self.trained),
            "traffic": [self.traffic.down_total, self.traffic.up_total],
            "ledger": {"epsilon": self.ledger.epsilon, "noise": self.ledger.noise} if self.ledger else None,
        }
        save_checkpoint(self.recorder.run_dir, self.strategy.state_dict(), meta, label=f"checkpoint-{server_round}")

    def run(self) -> dict[str, Any]:
        params = count_parameters(self.workspace.model)
        self.reporter.start(
            f"{self.strategy.method.name} | {self.config.model} on {self.config.dataset} | "
            f"{self.config.num_clients} clients | {params.trainable:,} trainable params",
            self.config.num_rounds,
        )
        for server_round in range(self.start_round, self.config.num_rounds + 1):
            if self.stopped:
                break
            row = self.round(server_round)
            self.recorder.log(row)
            self.stopped = row.get("stopped", "")
            if not self.stopped:
                self._save_adapter()
            self._save(server_round, self.stopped)
            crash_point(f"after-round-{server_round}")
            if not self.stopped:
                self.reporter.round_finished(row)
        return self.finish()

    def round(self, server_round: int) -> dict[str, Any]:
        """Train (retried once when no client replies at all), aggregate, evaluate; the round's metrics row."""
        started = time.perf_counter()
        for attempt in (1, 2):
            messages, replies, result = self._train(server_round)
            if result.replies or attempt == 2:
                break
            self.reporter.note(f"round {server_round}: no client replied ({result.failed}); retrying the round once")
        clients = range(self.config.num_clients)  # a reply's id is its own claim: only this run's ids count
        trained = [r.partition_id for r in result.replies if isinstance(r, TrainReply)]
        self.trained.update(client for client in trained if client in clients)
        privacy = self.ledger.update(result.replies) if self.ledger is not None else {}
        if result.arrays is None:
            return self._no_update(server_round, result, privacy)
        self.arrays = result.arrays
        row = {"round": server_round, "strategy": self.strategy.method.name, **result.record(), **privacy}
        train_time = time.perf_counter() - started  # configure, train, aggregate (no evaluation)
        row.update(self.evaluate(server_round))
        row.update(self.traffic.count(messages, replies))
        row.update(self.node_report())
        row.update(
            train_round_time=train_time, round_time=time.perf_counter() - started, wall_time=self.recorder.elapsed()
        )
        return row

    def _train(self, server_round: int) -> tuple[list[Message], list[Message], TrainRoundResult]:
        messages = list(self.strategy.configure_train(server_round, self.arrays, self._run_fields(), self.grid))
        self.reporter.round_started(server_round, len(messages))
        replies = send_and_collect(self.grid, messages, self.timeout)
        return messages, replies, self.strategy.train_round(server_round, replies, sent=messages)

    def _run_fields(self) -> ConfigRecord:
        """What every instruction of this run carries: its run key and, if its clients keep state, who trained."""
        config = ConfigRecord({wire.RUN_KEY: self.recorder.run_key})
        if self.keeps_client_state and self.trained:
            config[wire.TRAINED_BEFORE] = wire.encode_client_set(self.trained)
        return config

    def _no_update(self, server_round: int, result: TrainRoundResult, privacy: dict[str, Any]) -> dict[str, Any]:
        if result.refused and len(result.refused) == len(result.replies) and not result.rejected:
            self.reporter.note(f"round {server_round}: every client has spent its privacy budget; stopping")
            return {"round": server_round, "stopped": "privacy budget exhausted", **privacy}
        reasons = sorted(set(result.failed.values()) | set(result.rejected.values()))[:3]
        saved = f"is saved after round {server_round - 1}" if server_round > 1 else "has no finished round yet"
        raise FederationError(
            f"round {server_round}: no client returned a result ({'; '.join(reasons) or 'no replies'}). The run "
            f"{saved}: fix the cause, then continue it with --resume."
        )

    def evaluate(self, server_round: int) -> dict[str, Any]:
        last_round = server_round == self.config.num_rounds
        config = self._run_fields()
        config[wire.TEST_SET] = self.evaluation.clients_score_test_set(last_round)
        messages = list(self.strategy.configure_evaluate(server_round, self.arrays, config, self.grid))
        metrics = {}
        if messages:
            replies = send_and_collect(self.grid, messages, self.timeout)
            metrics = self.strategy.evaluate_round(server_round, replies)
        metrics = {**metrics, **self.evaluation.server_metrics(server_round, last_round, self.strategy)}
        self.workspace.save_generated_samples(self.recorder, server_round)
        return metrics

    def _save_adapter(self) -> Path:
        """The global adapter as a standard peft adapter folder (for a method whose clients keep their own B:
        Ā with the initial B; each client's B stays in its client state)."""
        self.workspace.load_global(self.strategy.global_model_state())
        return self.recorder.save_adapter(
            self.workspace.model, self.workspace.tokenizer, self.strategy.base_residuals()
        )

    def finish(self) -> dict[str, Any]:
        """Write the run summary (the adapter of the last finished round is already on disk)."""
        adapter_dir = self.recorder.run_dir / "adapter"
        if not adapter_dir.is_dir():
            adapter_dir = self._save_adapter()  # a run that never finished a round: the initial adapter
        rows = read_metrics(self.recorder.run_dir)
        final = next((row for row in reversed(rows) if "test_accuracy" in row), rows[-1] if rows else {})
        lr_key, lr = self.config.dp.lr_setting(self.config.train)  # the rate the clients trained at
        summary = {
            "run_dir": str(self.recorder.run_dir),
            **summary_scores(final),
            "dp_epsilon_max": self.ledger.update([])["dp_epsilon_max"] if self.ledger is not None else None,
            "bytes_down_total": self.traffic.down_total,
            "bytes_up_total": self.traffic.up_total,
            "wall_time": self.recorder.elapsed(),
            "rounds": len(rows),
            "stopped": self.stopped or None,
            "label_names": self.workspace.task.label_names,
            "unseen_test_labels": self.workspace.task.unseen_test_labels or None,
            "learning_warning": learning_warning(final, lr, lr_key),
            "plot": str(plot_run(self.recorder.run_dir)) if rows else None,
            "adapter": str(adapter_dir),
        }
        self.recorder.write_json("summary.json", summary)
        if summary["learning_warning"]:
            self.reporter.note(summary["learning_warning"])
        self.reporter.finish(rows, {k: v for k, v in summary.items() if k != "label_names"})
        return summary


def run_server(grid: Grid, config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run ``config.num_rounds`` rounds of ``config.strategy`` over ``grid``; return the run summary."""
    return FederatedRun(grid, config, reporter or Reporter()).run()


def make_server_app(bound_config: RunConfig | None = None, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp; ``bound_config`` fixes the run config (tests), else it comes from the run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = bound_config if bound_config is not None else RunConfig.from_flat(dict(context.run_config))
        run_server(grid, config, reporter)

    return app


app = make_server_app()
