"""Adapter state as plain tensors: which side of the adapter a key is on, LoRA factor pairs per layer, folded
residuals and rank slices. Torch only (no peft), so the message protocol, the methods and the registry stay
light to import; ``fedlowrank.adapters`` (peft) re-exports all of it.

Keys are peft's own (``...query.lora_A.weight``, ``...query.lora_B.weight``, a trained head's
``...classifier.weight``), so a state written here loads with peft.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

LORA_A = "lora_A"
LORA_B = "lora_B"
# Which side of the adapter a trainable tensor is on: LoRA's A and B, VeRA's λ_d (scales the A side) and
# λ_b (scales the B side). Methods that share, freeze or keep one side local act on these roles.
A_SIDE = (f".{LORA_A}.", ".vera_lambda_d")
B_SIDE = (f".{LORA_B}.", ".vera_lambda_b")
# VeRA's frozen random projections: regenerated from the seed in every process, never sent.
FROZEN_SHARED = ("vera_A", "vera_B")


@dataclass(frozen=True)
class LayerFactors:
    """One adapted linear layer: A (r x d_in) and B (d_out x r) as peft stores them."""

    A: torch.Tensor
    B: torch.Tensor


@functools.lru_cache(maxsize=65536)  # a run has tens of keys, asked about for every client's every tensor
def key_role(key: str) -> str:
    """The side of an adapter-state key: "A", "B", "frozen" (VeRA projections) or "head" (anything else)."""
    if any(marker in key for marker in A_SIDE):
        return "A"
    if any(marker in key for marker in B_SIDE):
        return "B"
    if key.rsplit(".", 1)[-1] in FROZEN_SHARED or any(f".{name}." in key for name in FROZEN_SHARED):
        return "frozen"
    return "head"


def select_roles(state: dict[str, torch.Tensor], *roles: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if key_role(k) in roles and not k.endswith(RESIDUAL_SUFFIX)}


@functools.lru_cache(maxsize=65536)
def layer_name(key: str) -> str | None:
    """``...query.lora_A.weight`` -> ``...query``; None for keys that are not LoRA factors."""
    for marker in (f".{LORA_A}.", f".{LORA_B}."):
        if marker in key:
            return key.split(marker)[0]
    return None


def lora_factors(
    state: dict[str, torch.Tensor], fill_from: dict[str, LayerFactors] | None = None
) -> dict[str, LayerFactors]:
    """Pair A and B per adapted layer.

    A factor missing from ``state`` (a method that uploads only A or only B) is taken from ``fill_from``;
    without it, both must be present for every layer.
    """
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = layer_name(key)
        if layer is None or not key.endswith(".weight"):
            continue
        (a_parts if f".{LORA_A}." in key else b_parts)[layer] = value
    if fill_from is not None:
        for layer in set(a_parts) | set(b_parts):
            a_parts.setdefault(layer, fill_from[layer].A)
            b_parts.setdefault(layer, fill_from[layer].B)
    if set(a_parts) != set(b_parts):
        raise KeyError(f"unpaired LoRA factors for layers {sorted(set(a_parts) ^ set(b_parts))[:5]}")
    return {layer: LayerFactors(A=a_parts[layer], B=b_parts[layer]) for layer in sorted(a_parts)}


def factor_keys(layer: str) -> tuple[str, str]:
    return f"{layer}.{LORA_A}.weight", f"{layer}.{LORA_B}.weight"


def factor_state(factors: dict[str, LayerFactors], with_a: bool = True, with_b: bool = True) -> dict[str, torch.Tensor]:
    """``{layer: (A, B)}`` back to peft state keys."""
    state: dict[str, torch.Tensor] = {}
    for layer, pair in factors.items():
        key_a, key_b = factor_keys(layer)
        if with_a:
            state[key_a] = pair.A
        if with_b:
            state[key_b] = pair.B
    return state


# A residual travels as "<layer>.residual": ΔW = s·R in the layer's product orientation (d_out x d_in).
RESIDUAL_SUFFIX = ".residual"


def split_residuals(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate ``<layer>.residual`` entries (by layer) from adapter-state entries."""
    residuals = {k[: -len(RESIDUAL_SUFFIX)]: v for k, v in state.items() if k.endswith(RESIDUAL_SUFFIX)}
    rest = {k: v for k, v in state.items() if not k.endswith(RESIDUAL_SUFFIX)}
    return rest, residuals


def client_rank(ranks: list[int], partition_id: int, default: int) -> int:
    """Client ``partition_id``'s LoRA rank under heterogeneous ranks (cycled over the list), else ``default``."""
    return ranks[partition_id % len(ranks)] if ranks else default


def slice_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The leading ``rank`` components of every LoRA factor in ``state`` (what a rank-r_k client uploads)."""
    out = {}
    for key, value in state.items():
        role = key_role(key)
        if role == "A" and value.dim() == 2 and rank < value.shape[0]:
            out[key] = value[:rank].contiguous()
        elif role == "B" and value.dim() == 2 and rank < value.shape[1]:
            out[key] = value[:, :rank].contiguous()
        else:
            out[key] = value
    return out


_NUMPY_FLOATS = (torch.float32, torch.float64)


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys (sorted) of the tensors that hold NaN or ±inf. All of them are checked in one pass first: a
    reply has tens of tensors and a round hundreds of replies, and almost always every value is finite."""
    if all_finite(tensors.values()):
        return []
    return sorted(key for key, value in tensors.items() if not bool(value.detach().isfinite().all()))


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no tensor holds NaN or ±inf, in as few passes as possible: views of one tensor are checked
    through it, once (a batched wave's clients end as rows of a few stacked copies: 512 clients' states are
    ~10 checks, not 5,120); small CPU tensors in one numpy call (numpy's calls cost a fraction of torch's on
    small tensors). A non-finite value elsewhere in a viewed tensor makes this False; ``non_finite_keys``
    then looks at each tensor itself."""
    owners: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        owner = tensor._base if tensor._base is not None else tensor
        owners[id(owner)] = owner
    values = [owner.detach() for owner in owners.values()]
    if not all(value.device.type == "cpu" and value.dtype in _NUMPY_FLOATS for value in values):
        return all(bool(value.isfinite().all()) for value in values)
    arrays = [value.numpy().reshape(-1) for value in values]
    if len(arrays) > 1 and sum(array.size for array in arrays) <= _FINITE_AT_ONCE:
        return bool(np.isfinite(np.concatenate(arrays)).all())  # one call for a reply's tens of small tensors
    return all(bool(np.isfinite(array).all()) for array in arrays)


_FINITE_AT_ONCE = 1 << 18  # values concatenated into one check; past that, copying costs more than calls
