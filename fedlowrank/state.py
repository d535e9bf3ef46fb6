"""Per-client state kept between rounds (a client's own B, its DP accountant).

A store maps (client, name) to a flat ``{key: tensor}``. ``DiskStateStore`` writes one safetensors file per
client and name, so thousands of simulated clients cost disk, not RAM, and the state outlives the process.
The Flower ``Context.state`` backend lives with the ClientApp (``clients/state.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file


class ClientStateStore(Protocol):
    def load(self, client: str, name: str) -> dict[str, torch.Tensor] | None: ...

    def save(self, client: str, name: str, tensors: dict[str, torch.Tensor]) -> None: ...


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
