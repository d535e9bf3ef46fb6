"""The fedlowrank ServerApp (Flower Message API) and its round loop.

``run_server`` drives any ``LoRAStrategy`` over any Flower ``Grid`` (Flower's simulation, real
SuperNodes, or the in-process grid of ``strategies.simulation``) and writes ``runs/<name>/``.
"""

from __future__ import annotations

import random
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedlowrank.adapters import count_parameters
from fedlowrank.config import RunConfig
from fedlowrank.progress import Reporter
from fedlowrank.report import RunRecorder, plot_run, read_metrics
from fedlowrank.runtime import Workspace, get_workspace
from fedlowrank.training import evaluate
from strategies.base import LoRAStrategy, is_refusal
from strategies.records import record_bytes
from strategies.registry import build_strategy, canonical_name


def sampling_seed(seed: int, server_round: int, phase: str) -> int:
    return seed * 1_000_003 + server_round * 2 + (phase == "evaluate")


class FederationError(RuntimeError):
    """A round in which no client produced a result."""


def _error_reasons(replies: list[Message]) -> str:
    reasons = sorted({reply.error.reason for reply in replies if reply.has_error()})
    return "; ".join(reasons[:3]) or "no replies (timeout?)"


def _reply_arrays(reply: Message) -> ArrayRecord | None:
    return next(iter(reply.content.array_records.values()), None)


def evaluate_global(workspace: Workspace, strategy: LoRAStrategy) -> dict[str, float]:
    """The global model (adapter plus anything folded into the frozen weight) on the global test set."""
    workspace.load_global(strategy.global_model_state())
    result = evaluate(workspace.model, workspace.test_loader(), workspace.task.num_labels)
    return result.as_dict("test_")


PERSONALIZED_KEYS = {
    "personalization-gap": "personalization_gap",
    "test-accuracy": "test_accuracy",
    "test-f1": "test_f1",
    "test-loss": "test_loss",
}


def wait_for_nodes(grid: Grid, config: RunConfig, poll_seconds: float = 1.0) -> None:
    """Every partition needs its node: fail clearly instead of waiting forever for missing ones."""
    deadline = time.monotonic() + config.node_wait_seconds
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= config.num_clients:
            return
        if time.monotonic() >= deadline:
            raise FederationError(
                f"only {connected} node(s) connected after {config.node_wait_seconds:.0f} s, but num-clients="
                f"{config.num_clients}. With `flwr run .` pass --federation-config "
                f'"num-supernodes={config.num_clients}"; in a deployment start one SuperNode per partition '
                '(--node-config "partition-id=K num-partitions=N").'
            )
        time.sleep(poll_seconds)


class EpsilonLedger:
    """The server's per-client record of cumulative sample-level ε (as each client last reported it)."""

    def __init__(self) -> None:
        self.epsilon: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.refusals: dict[str, int] = {}

    def update(self, replies: list[Message]) -> dict[str, Any]:
        refused_now = []
        for reply in replies:
            metrics = next(iter(reply.content.metric_records.values()), {})
            if "dp-epsilon" not in metrics:
                continue
            client = str(int(metrics["partition-id"]))
            self.epsilon[client] = float(metrics["dp-epsilon"])
            if float(metrics.get("dp-refused", 0)) > 0:
                refused_now.append(client)
                self.refusals[client] = self.refusals.get(client, 0) + 1
            else:
                self.noise[client] = float(metrics["dp-noise-multiplier"])
        ordered = dict(sorted(self.epsilon.items(), key=lambda item: int(item[0])))
        return {
            "dp_epsilon_max": max(ordered.values(), default=0.0),
            "dp_epsilon_per_client": ordered,
            "dp_noise_multiplier_per_client": dict(sorted(self.noise.items(), key=lambda item: int(item[0]))),
            "dp_refused_clients": refused_now,
        }


def run_server(grid: Grid, config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run ``config.num_rounds`` rounds of ``config.strategy`` over ``grid``; return the run summary."""
    reporter = reporter or Reporter()
    canonical_name(config.strategy)
    workspace = get_workspace(config)
    _ = workspace.client_splits  # partition now: data errors surface before any training
    strategy: LoRAStrategy = build_strategy(config, workspace.initial_state)
    wait_for_nodes(grid, config)
    personalized = strategy.spec.local_b  # FedSA: no global model; clients evaluate their own
    recorder = RunRecorder.create(config)
    arrays = strategy.broadcast_record()
    params = count_parameters(workspace.model)

    reporter.start(
        f"{canonical_name(config.strategy)} | {config.model} on {config.dataset} | {config.num_clients} clients | "
        f"{params.trainable:,} trainable params",
        config.num_rounds,
    )
    total_down = total_up = 0
    ledger = EpsilonLedger()
    for server_round in range(1, config.num_rounds + 1):
        round_started = time.perf_counter()
        random.seed(sampling_seed(config.seed, server_round, "train"))  # FedAvg samples with the global RNG
        train_messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"seed": config.seed}), grid))
        bytes_down = sum(record_bytes(m.content[strategy.arrayrecord_key]) for m in train_messages)
        reporter.round_started(server_round, len(train_messages))
        replies = list(grid.send_and_receive(train_messages))
        ok_replies = [r for r in replies if not r.has_error()]
        bytes_up = sum(record_bytes(_reply_arrays(r)) for r in ok_replies)
        privacy = ledger.update(ok_replies) if config.dp.sample_level else {}
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            if ok_replies and all(is_refusal(r) for r in ok_replies):
                reporter.note(f"round {server_round}: every client has spent its privacy budget; stopping")
                recorder.log({"round": server_round, "stopped": "privacy budget exhausted", **privacy})
                break
            raise FederationError(f"round {server_round}: no client returned a result: {_error_reasons(replies)}")
        arrays = new_arrays
        train_round_time = time.perf_counter() - round_started  # configure, train, aggregate (no evaluation)

        row: dict[str, Any] = {
            "round": server_round,
            "strategy": canonical_name(config.strategy),
            "clients_trained": len(ok_replies),
            "clients_failed": len(replies) - len(ok_replies) + (len(train_messages) - len(replies)),
            "train_loss": float(train_metrics["train-loss"]) if train_metrics else None,
        }
        row.update(strategy.round_info)
        row.update(privacy)
        last_round = server_round == config.num_rounds
        eval_config = ConfigRecord({"eval-global-test": personalized and last_round})
        random.seed(sampling_seed(config.seed, server_round, "evaluate"))
        eval_messages = list(strategy.configure_evaluate(server_round, arrays, eval_config, grid))
        if eval_messages:
            eval_metrics = strategy.aggregate_evaluate(server_round, list(grid.send_and_receive(eval_messages)))
            if eval_metrics:
                row["client_eval_loss"] = float(eval_metrics["eval-loss"])
                row["client_eval_accuracy"] = float(eval_metrics["eval-accuracy"])
                row["client_eval_f1"] = float(eval_metrics["eval-f1"])
                row.update({PERSONALIZED_KEYS[k]: float(v) for k, v in eval_metrics.items() if k in PERSONALIZED_KEYS})
        if personalized:
            row["test_eval"] = "personalized-mean"  # each client's own model on the global test set, averaged
        elif server_round % config.server_eval_every == 0 or last_round:
            row.update(evaluate_global(workspace, strategy))
        total_down += bytes_down
        total_up += bytes_up
        row.update(
            {
                "bytes_down": bytes_down,
                "bytes_up": bytes_up,
                "bytes_down_per_client": bytes_down // max(len(train_messages), 1),
                "bytes_up_per_client": bytes_up // max(len(ok_replies), 1),
                "train_round_time": train_round_time,
                "round_time": time.perf_counter() - round_started,
                "wall_time": recorder.elapsed(),
            }
        )
        recorder.log(row)
        reporter.round_finished(row)

    # The final global adapter, as a standard peft adapter folder (for FedSA: Ā with the initial B;
    # each client's own B stays in its client state).
    workspace.load_global(strategy.global_model_state())
    if strategy.folded:
        # FedEx / FLoRA changed the frozen weights too: keep them beside the adapter.
        from safetensors.torch import save_file

        (recorder.run_dir / "adapter").mkdir(parents=True, exist_ok=True)
        save_file(
            {layer: (strategy.scale * m).float().contiguous() for layer, m in strategy.folded.items()},
            str(recorder.run_dir / "adapter" / "base_residuals.safetensors"),
        )
    adapter_dir = recorder.run_dir / "adapter"
    workspace.model.save_pretrained(adapter_dir)
    workspace.tokenizer.save_pretrained(adapter_dir)
    rows = read_metrics(recorder.run_dir)
    final = next((row for row in reversed(rows) if "test_accuracy" in row), rows[-1])
    summary = {
        "run_dir": str(recorder.run_dir),
        "test_accuracy": final.get("test_accuracy"),
        "test_f1": final.get("test_f1"),
        "test_loss": final.get("test_loss"),
        "dp_epsilon_max": ledger.update([])["dp_epsilon_max"] if config.dp.sample_level else None,
        "bytes_down_total": total_down,
        "bytes_up_total": total_up,
        "wall_time": recorder.elapsed(),
        "label_names": workspace.task.label_names,
        "plot": str(plot_run(recorder.run_dir)),
        "adapter": str(adapter_dir),
    }
    recorder.write_json("summary.json", summary)
    reporter.finish(rows, {k: v for k, v in summary.items() if k != "label_names"})
    return summary


def make_server_app(bound_config: RunConfig | None = None, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp; ``bound_config`` fixes the run config (tests), else it comes from the run_config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = bound_config if bound_config is not None else RunConfig.from_flat(dict(context.run_config))
        run_server(grid, config, reporter)

    return app


app = make_server_app()
