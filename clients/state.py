"""Where a client keeps what it carries between rounds (its own B, its DP accountant): Flower's
``Context.state`` (in simulation and on a SuperNode), or one safetensors file per client and item on disk
(``fedlowrank.state.DiskStateStore``) for many simulated clients or state that must survive a restart."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import Context

from fedlowrank.config import RunConfig
from fedlowrank.protocol.flower import record_to_state, state_to_record
from fedlowrank.state import ClientStateStore, DiskStateStore

DISK_STATE_ABOVE = 256  # "auto" keeps state in Context.state up to this many clients


class ContextStateStore:
    """Client state in Flower's ``Context.state`` (persists across rounds in simulation and on a SuperNode)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None:
        record = self.context.state.array_records.get(f"fedlowrank.{name}")
        return None if record is None else record_to_state(record)

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.context.state[f"fedlowrank.{name}"] = state_to_record(tensors)


def state_store(config: RunConfig, context: Context) -> ClientStateStore:
    kind = config.client_state
    if kind == "auto":
        kind = "disk" if config.num_clients > DISK_STATE_ABOVE else "context"
    if kind == "disk":
        return DiskStateStore(config.client_state_dir or str(Path(config.output_dir) / config.name / "client-state"))
    return ContextStateStore(context)
