"""What every method shares, free of Flower: the method spec, the round's input and output, weighting."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedlowrank.adapters import LayerFactors, key_role


@dataclass(frozen=True)
class MethodSpec:
    """What a method's clients train and send."""

    name: str
    train_a: bool = True
    train_b: bool = True
    upload_a: bool = True
    upload_b: bool = True
    download_a: bool = True
    download_b: bool = True
    # FedSA-LoRA: each client keeps its own B between rounds (and, optionally, its head).
    local_b: bool = False
    # FFA-LoRA: the frozen A must be bit-identical everywhere; clients send its checksum, the server checks.
    check_shared_a: bool = False


@dataclass
class RoundInput:
    clients: list[dict[str, LayerFactors]]  # each client's factors (missing uploads filled from ``previous``)
    weights: torch.Tensor  # p_k, float64, sums to one
    previous: dict[str, LayerFactors]  # the global factors the clients started from
    server_round: int
    # M* = Σ p_k B_k A_k per layer when it cannot be formed from ``clients`` (user-level DP releases a
    # noisy M* alongside the noisy mean factors); None: computed from the clients.
    target_products: dict[str, torch.Tensor] | None = None


@dataclass
class ServerUpdate:
    factors: dict[str, LayerFactors]  # the new global factors
    # Products to fold into the frozen weight this round (W0 += s·R): FedEx's residual, FLoRA's merge.
    fold: dict[str, torch.Tensor] = field(default_factory=dict)


ServerMath = Callable[[RoundInput], ServerUpdate]


def client_weights(num_examples: Sequence[int | float], weighting: str = "num-examples") -> torch.Tensor:
    """p_k = n_k / sum n ("num-examples") or 1/K ("uniform"), in float64."""
    counts = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if weighting == "uniform":
        return torch.full_like(counts, 1.0 / len(counts))
    if weighting != "num-examples":
        raise ValueError(f"unknown weighting {weighting!r}")
    if counts.sum() <= 0:
        raise ValueError("all clients reported zero examples; cannot weight by example count")
    return counts / counts.sum()


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in float64 and returned in the inputs' dtype."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (weights.to(torch.float64).view(shape) * stacked).sum(dim=0).to(tensors[0].dtype)


def a_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the bytes of every A-side and frozen shared tensor (LoRA A; VeRA λ_d and projections)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in state if key_role(k) in ("A", "frozen")):
        digest.update(key.encode())
        digest.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
