"""Checkpoints that survive a kill at any moment: one safetensors file, written to a temporary name, flushed to
disk (fsync), then renamed over the old one, so a reader sees the previous checkpoint or the new one, never a
torn one. Tensors keep their dtype (float64 stays float64); ``meta`` is JSON in the file's header.

``crash_point`` is a test hook: with ``FEDLOWRANK_TEST_CRASH_AT=<point>`` in the environment the process kills
itself (SIGKILL, as ``kill -9``) when it reaches that point, so tests can stop a run exactly between rounds, in
the middle of a round or while a checkpoint is being written.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT = "checkpoint.safetensors"
_META_KEY = "fedlowrank"
CRASH_ENV = "FEDLOWRANK_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if the test hook names ``name`` (see the module docstring)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, write: Any, label: str = "") -> None:
    """``write(temporary_path)`` then fsync and rename it over ``path`` (and fsync the folder). ``label`` names
    the moment between the two for ``crash_point`` ("writing:<label>")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    if label:
        crash_point(f"writing:{label}")
    os.replace(partial, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors writes them: on the CPU, contiguous, each in memory of its own (views, such
    as rows of one stacked tensor read from a round's replies, share their owner's memory, which it refuses)."""
    out = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        out[key] = value.clone() if value._base is not None else value
    return out


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], label: str = "") -> None:
    def write(target: Path) -> None:
        save_file(savable(tensors), str(target), metadata={_META_KEY: json.dumps(meta)})

    write_atomic(Path(run_dir) / CHECKPOINT, write, label)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The run's last checkpoint, or None when it has none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[_META_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix/key: value}`` — one checkpoint holds several named groups of tensors."""
    return {f"{prefix}/{key}": value for key, value in tensors.items()}


def unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(f"{prefix}/")}
