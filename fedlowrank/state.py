"""Per-client state kept between rounds (a client's own B, its DP accountant), versioned by round.

A store maps (client, name) to a flat ``{key: tensor}``, saved with the round that produced it. A client
reads the newest version up to a round it names: a round's training reads what the rounds before it left, its
evaluation what that round left. So when a crashed run is resumed and a round runs again, each client starts
from exactly the state it had the first time, even if it had already saved that round's state before the crash.
Two versions are kept per item (the newest and the one before it). ``DiskStateStore`` writes one safetensors
file per client, item and version (atomically: a temporary file, then a rename), so thousands of simulated
clients cost disk, not RAM, and the state outlives the process. A node's folder outlives runs too, so each run
keeps its clients' state in a subfolder of its own, named by its run key (``clients/state.py``). The Flower
``Context.state`` backend lives with the ClientApp (``clients/state.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from fedlowrank.checkpoint import savable, write_atomic

_VERSIONED = re.compile(r"^(?P<name>.+)@(?P<round>\d+)$")


class ClientStateStore(Protocol):
    def load(self, client: str, name: str, upto: int) -> dict[str, torch.Tensor] | None: ...

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor], version: int) -> None: ...


def versioned(name: str, version: int) -> str:
    return f"{name}@{version}"


def newest_upto(entries: list[str], name: str, upto: int) -> str | None:
    """The entry of ``name`` with the highest version ≤ ``upto`` among ``entries`` (``name@round``)."""
    versions = [(int(m["round"]), entry) for entry in entries if (m := _VERSIONED.match(entry)) and m["name"] == name]
    eligible = [item for item in versions if item[0] <= upto]
    return max(eligible)[1] if eligible else None


def stale(entries: list[str], name: str, version: int) -> list[str]:
    """Versions of ``name`` older than the newest one below ``version`` (what saving ``version`` makes obsolete)."""
    versions = sorted(int(m["round"]) for e in entries if (m := _VERSIONED.match(e)) and m["name"] == name)
    below = [v for v in versions if v < version]
    keep_from = below[-1] if below else version
    return [versioned(name, v) for v in versions if v < keep_from]


class DiskStateStore:
    """``<root>/<client>/<name>@<round>.safetensors``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _entries(self, client: str) -> list[str]:
        folder = self.root / str(client)
        return [path.stem for path in folder.glob("*.safetensors")] if folder.is_dir() else []

    def load(self, client: str, name: str, upto: int) -> dict[str, torch.Tensor] | None:
        entry = newest_upto(self._entries(client), name, upto)
        return None if entry is None else load_file(str(self.root / str(client) / f"{entry}.safetensors"))

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor], version: int) -> None:
        folder = self.root / str(client)
        contiguous = savable(tensors)
        target = folder / f"{versioned(name, version)}.safetensors"
        write_atomic(target, lambda partial: save_file(contiguous, str(partial)))
        for old in stale(self._entries(client), name, version):
            (folder / f"{old}.safetensors").unlink(missing_ok=True)
