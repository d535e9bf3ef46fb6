"""The fedlowrank ClientApp (Flower Message API): local LoRA training and evaluation.

The model, tokenizer and this node's data partition are loaded once per process (``get_workspace``);
each message only swaps adapter tensors in. Replies carry fp32 arrays and a ``num-examples`` weight.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlowrank.adapters import adapter_state, load_adapter_state
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.runtime import Workspace, get_workspace
from fedlowrank.training import evaluate, train_local
from strategies.records import record_to_state, state_to_record


def resolve_config(context: Context, bound: RunConfig | None) -> RunConfig:
    return bound if bound is not None else RunConfig.from_flat(dict(context.run_config))


def partition_id(context: Context, config: RunConfig) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ConfigError("this SuperNode has no 'partition-id' in its --node-config")
    pid = int(node_config["partition-id"])
    partitions = int(node_config.get("num-partitions", config.num_clients))
    if partitions != config.num_clients:
        raise ConfigError(
            f"SuperNode says num-partitions={partitions} but the run has num-clients={config.num_clients}; "
            "they must agree so that every node reads its own share of the data"
        )
    return pid


def load_global_adapter(workspace: Workspace, message: Message) -> None:
    """Start from the run's initial adapter, then apply whatever the server sent."""
    load_adapter_state(workspace.model, workspace.initial_state)
    load_adapter_state(workspace.model, record_to_state(message.content["arrays"]), strict=False)


def client_seed(config: RunConfig, server_round: int, pid: int) -> int:
    return config.seed * 1_000_003 + server_round * 10_007 + pid


def make_client_app(bound_config: RunConfig | None = None) -> ClientApp:
    """A ClientApp; ``bound_config`` fixes the run config (tests, in-process simulation)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config = resolve_config(context, bound_config)
        workspace = get_workspace(config)
        pid = partition_id(context, config)
        server_round = int(message.content["config"]["server-round"])
        load_global_adapter(workspace, message)
        seed = client_seed(config, server_round, pid)
        started = time.perf_counter()
        result = train_local(
            workspace.model, workspace.client_train_loader(pid, seed), config.train, config.optimizer, seed=seed
        )
        metrics = MetricRecord(
            {
                "num-examples": result.dataset_size,
                "train-loss": result.loss,
                "num-steps": result.num_steps,
                "train-time": time.perf_counter() - started,
            }
        )
        arrays = state_to_record(adapter_state(workspace.model, trainable_only=True))
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate_on_validation(message: Message, context: Context) -> Message:
        config = resolve_config(context, bound_config)
        workspace = get_workspace(config)
        pid = partition_id(context, config)
        load_global_adapter(workspace, message)
        result = evaluate(workspace.model, workspace.client_validation_loader(pid), workspace.task.num_labels)
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "eval-loss": result.loss if result.num_examples else 0.0,
                "eval-accuracy": result.accuracy if result.num_examples else 0.0,
                "eval-f1": result.macro_f1 if result.num_examples else 0.0,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


app = make_client_app()
