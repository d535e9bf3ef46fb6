"""Per-client state kept between rounds (FedSA's local B, later DP accountants and optimizer moments).

A store maps (client, name) to a flat ``{key: tensor}``. ``MemoryStateStore`` keeps it in a dict;
``DiskStateStore`` writes one safetensors file per client and name, so thousands of simulated clients
cost disk, not RAM. The Flower ``Context.state`` backend lives with the ClientApp (``clients/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file


class ClientStateStore(Protocol):
    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None: ...

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None: ...


class MemoryStateStore:
    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None:
        stored = self._data.get((client, name))
        return None if stored is None else {k: v.clone() for k, v in stored.items()}

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self._data[(client, name)] = {k: v.detach().to("cpu").clone() for k, v in tensors.items()}


class DiskStateStore:
    """``<root>/<client>/<name>.safetensors``; writes go to a temporary file first, then rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, client: str, name: str) -> Path:
        return self.root / str(client) / f"{name}.safetensors"

    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None:
        path = self._path(client, name)
        return load_file(str(path)) if path.is_file() else None

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(client, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(partial))
        partial.replace(path)
