"""One message's view of this node: its run config, the shared workspace, its partition, its state store.

A node sets the shared model to what this client starts from (the broadcast, plus what it keeps for itself
when its method keeps a local B), and turns a trained adapter into what it keeps and what it uploads, as the
instruction's method spec says. It knows no method by name.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from flwr.app import Context

from clients.state import state_store
from fedlowrank.adapters import (
    adapter_state,
    client_rank,
    load_adapter_state,
    lora_factors,
    select_roles,
    slice_rank,
)
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.metrics import personalization_gap
from fedlowrank.protocol import EvaluateInstruction, MethodSpec, TrainInstruction
from fedlowrank.runtime import Workspace, get_workspace

LOCAL_ADAPTER = "local-adapter"  # what the client keeps of its adapter (its own B, and head)
LAST_TRAINED_A = "last-trained-a"  # the A it trained last, for the personalisation gap


class ClientFailure(RuntimeError):
    """This client reports a failure instead of an update, with the reason; the others of its wave go on."""


class ClientStateLost(ClientFailure):
    """The server says this client trained earlier in the run, but what it keeps between rounds is not in its
    state: its node lost it. Training anyway would restart its DP accountant (ε under-reported, the budget no
    longer enforced) or its own B."""


def resolve_config(context: Context, bound: RunConfig | None) -> RunConfig:
    """The run config: bound in-process, else the submitted run config with this node's own data location (its
    ``--node-config`` ``data-dir``, or ``$FEDLOWRANK_DATA`` on the node): a node never reads a path the submitter
    sent."""
    if bound is not None:
        return bound
    config = RunConfig.from_flat(dict(context.run_config))
    return replace(config, data_dir=str(context.node_config.get("data-dir", "")))


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


def client_seed(config: RunConfig, server_round: int, pid: int) -> int:
    return config.seed * 1_000_003 + server_round * 10_007 + pid


class ClientNode:
    """``server_round`` and ``reading_upto``: the state this message may read is the newest saved up to
    ``reading_upto`` (a round's training: the rounds before it; its evaluation: that round too), and what it
    saves is ``server_round``'s (see ``fedlowrank.state``); ``run_key``: the run's own folder in the node's
    state (the instruction's)."""

    def __init__(
        self,
        context: Context,
        bound: RunConfig | None,
        server_round: int,
        reading_upto: int,
        run_key: str = "",
        trained_before: frozenset[int] = frozenset(),
    ) -> None:
        self.config = resolve_config(context, bound)
        self.partition_id = partition_id(context, self.config)
        self.store = state_store(self.config, context, in_process=bound is not None, run_key=run_key)
        self.workspace: Workspace = get_workspace(self.config)
        self.key = str(self.partition_id)
        self.server_round, self.reading_upto = server_round, reading_upto
        self.trained_before = self.partition_id in trained_before  # the server's word: its state must exist

    @classmethod
    def training(cls, context: Context, bound: RunConfig | None, instruction: TrainInstruction) -> ClientNode:
        """For a round's training: it reads what the rounds before it left."""
        round_, key, trained = instruction.server_round, instruction.run_key, instruction.trained_before
        return cls(context, bound, round_, round_ - 1, run_key=key, trained_before=trained)

    @classmethod
    def evaluating(cls, context: Context, bound: RunConfig | None, instruction: EvaluateInstruction) -> ClientNode:
        """For a round's evaluation: it reads what that round left too."""
        round_, key, trained = instruction.server_round, instruction.run_key, instruction.trained_before
        return cls(context, bound, round_, round_, run_key=key, trained_before=trained)

    def load_state(self, name: str) -> dict[str, torch.Tensor] | None:
        """The newest saved ``name``; None if this client has none yet (``ClientStateLost`` if it should)."""
        saved = self.store.load(self.key, name, self.reading_upto)
        if saved is None and self.trained_before:
            raise ClientStateLost(
                f"client {self.partition_id} trained earlier in this run, but its {name!r} is not in its state: "
                "its node lost its client state (restarted or resumed without a state-dir, or with another "
                "one). It neither trains nor scores, since it would start its DP accountant or its own B over. "
                "It can take part again only once its folder <state-dir>/<run-key>/<client> is back (the node "
                "started with the state-dir it had); otherwise it is out of this run. Keep client state on "
                "disk: start each SuperNode with --node-config \"state-dir='/path'\" (in-process: client-state "
                '= "disk").'
            )
        return saved

    def save_state(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.store.save(self.key, name, tensors, self.server_round)

    @property
    def model(self) -> torch.nn.Module:
        return self.workspace.model

    @property
    def rank(self) -> int:
        return client_rank(self.config.lora.client_ranks, self.partition_id, self.config.lora.r)

    def seed(self, server_round: int) -> int:
        return client_seed(self.config, server_round, self.partition_id)

    def load(self, state: dict[str, torch.Tensor], spec: MethodSpec) -> None:
        """The shared model := the broadcast ``state``, then what this client keeps for itself (a client seen
        for the first time keeps nothing yet: B = 0 and the initial head, from the initial adapter)."""
        self.workspace.load_global(state)
        if spec.kept_roles():
            own = self.load_state(LOCAL_ADAPTER)
            if own is not None:
                load_adapter_state(self.model, own, strict=False)

    def keep(self, state: dict[str, torch.Tensor], spec: MethodSpec) -> None:
        """Store what this client keeps between rounds (and the A it trained, for the personalisation gap)."""
        if spec.kept_roles():
            self.save_state(LOCAL_ADAPTER, select_roles(state, *spec.kept_roles()))
            self.save_state(LAST_TRAINED_A, select_roles(state, "A"))

    def upload(self, state: dict[str, torch.Tensor], spec: MethodSpec) -> dict[str, torch.Tensor]:
        """What goes up: the spec's sides, the leading r_k components for a rank-r_k client."""
        return slice_rank(select_roles(state, *spec.uploaded_roles(self.config.lora.train_head)), self.rank)

    def has_trained(self) -> bool:
        """Whether this client kept state of its own from a round it trained in."""
        return self.load_state(LOCAL_ADAPTER) is not None

    def personalization_gap(self) -> float:
        """Mean over layers of ‖B_k Ā − B_k A_k‖ / ‖B_k A_k‖ (0 before this client has trained; NaN for VeRA)."""
        own = self.load_state(LOCAL_ADAPTER)
        trained_a = self.load_state(LAST_TRAINED_A)
        if own is None or trained_a is None:
            return 0.0
        current = lora_factors(adapter_state(self.model))
        if not current:  # VeRA: no factor matrices
            return float("nan")
        b_parts = lora_factors(own, fill_from=current)
        a_parts = lora_factors(trained_a, fill_from=current)
        gaps = [personalization_gap(b_parts[layer].B, current[layer].A, a_parts[layer].A) for layer in current]
        return float(sum(gaps) / len(gaps))
