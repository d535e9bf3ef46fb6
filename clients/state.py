"""Where a client keeps what it carries between rounds (its own B, its DP accountant), versioned by round
(``fedlowrank.state``): Flower's ``Context.state`` (in memory, on the node: lost if the node restarts), or one
safetensors file per client, item and version on disk (``DiskStateStore``), which survives restarts.

The folder is the node's own: ``state-dir`` in the SuperNode's ``--node-config`` (an in-process simulation sets
it for its virtual nodes). A path in the run config that the submitter sends is used only in-process. Each run
keeps its clients' files in the subfolder its instructions name (``run_key``): a resumed run finds them again,
another run never reads them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from flwr.app import Context

from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.protocol.flower import COHORT_ID, record_to_state, state_to_record
from fedlowrank.state import ClientStateStore, DiskStateStore, newest_upto, stale, versioned

PREFIX = "fedlowrank."


class ContextStateStore:
    """Client state in Flower's ``Context.state`` (persists across rounds in simulation and on a SuperNode).

    ``shared``: the Context is a cohort node's, shared by the virtual clients it hosts, so each client's entries
    carry its name."""

    def __init__(self, context: Context, shared: bool = False) -> None:
        self.context, self.shared = context, shared

    def _prefix(self, client: str) -> str:
        return f"{PREFIX}{client}/" if self.shared else PREFIX

    def _entries(self, client: str) -> list[str]:
        prefix = self._prefix(client)
        return [key[len(prefix) :] for key in self.context.state.array_records if key.startswith(prefix)]

    def load(self, client: str, name: str, upto: int) -> dict[str, torch.Tensor] | None:
        entry = newest_upto(self._entries(client), name, upto)
        if entry is None:
            return None
        return record_to_state(self.context.state.array_records[self._prefix(client) + entry])

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor], version: int) -> None:
        self.context.state[self._prefix(client) + versioned(name, version)] = state_to_record(tensors)
        for old in stale(self._entries(client), name, version):
            del self.context.state[self._prefix(client) + old]


@functools.lru_cache(maxsize=256)
def _disk_store(root: str) -> DiskStateStore:
    """One store per folder, shared by the clients that use it (it holds only its path): a ``Path`` a client took
    ≈8 µs to build, hundreds of clients a round."""
    return DiskStateStore(root)


def state_store(config: RunConfig, context: Context, in_process: bool, run_key: str = "") -> ClientStateStore:
    """The node's ``state-dir`` (a disk store), else Flower's Context.state. ``client-state = "disk"`` needs a
    folder: the node's, or, in-process, ``client-state-dir`` (default ``<output-dir>/<name>/client-state``).

    On disk each run keeps its clients' state in its own subfolder, ``run_key`` (the folder outlives runs;
    Flower's Context is the run's own already)."""
    node_dir = str(context.node_config.get("state-dir", ""))
    shared = COHORT_ID in context.node_config  # a cohort member: the node's Context holds all its clients
    if config.client_state == "context":
        return ContextStateStore(context, shared)
    if not node_dir and config.client_state == "disk":
        if not in_process:
            raise ConfigError(
                "client-state = 'disk' needs a folder on this node: start the SuperNode with --node-config "
                "\"state-dir='/path/on/the/node'\" (a path in the run config is not used on a node)"
            )
        node_dir = config.client_state_dir or str(Path(config.output_dir) / config.name / "client-state")
    if node_dir:
        return _disk_store(str(Path(node_dir, run_key)))  # a checked key (``decode_*_instruction``)
    return ContextStateStore(context, shared)
