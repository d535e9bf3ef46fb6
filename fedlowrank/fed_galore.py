"""Federated GaLore: clients upload projected updates in a basis shared for the round.

Per 2-D parameter W (m x n) and round t, everyone uses the same projector P_t (basis fixed for the round):

* server: builds P_t — from a seed alone (``gaussian``: only ``derive_seed(seed, t, name)`` matters, so
  nothing but the seed need be sent) or from a server-side reference matrix (``svd``/``randomized-svd``:
  the basis is broadcast; ``dct``: the r column indices are) — and broadcasts ``compact_state()``;
* client k: trains, then uploads ``down(ΔW_k)`` (r x n or m x r) instead of ΔW_k (m x n);
* server: averages in projected space, ``L̄ = Σ_k w_k down(ΔW_k)`` with Σ w_k = 1, and applies
  ``W ← W + up(L̄)`` (:func:`projected_average`).

Because down/up are linear, up(L̄) = P Pᵀ Σ_k w_k ΔW_k (left side): with an orthonormal basis this is the
orthogonal projection of the average full-space update onto span(P), and equals the average itself
when every ΔW_k lies in span(P) — which a client training with GaLoreAdamW on the round's projector
(``update_gap=0``, no weight decay) guarantees, since each of its steps is up(·).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlowrank.projectors import Projector, derive_seed, make_projector, projector_from_state

_NEEDS_REFERENCE = ("svd", "randomized-svd", "dct")


def round_projector(
    kind: str,
    shape: tuple[int, int] | torch.Size,
    rank: int,
    seed: int,
    server_round: int,
    name: str = "",
    reference: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Projector:
    """The projector shared by all clients for one parameter in one round (basis fixed: ``update_gap=0``).

    Seeds are ``derive_seed(seed, server_round, name)``, so Gaussian bases differ per round and parameter and
    any peer rebuilds them from (seed, round, name). SVD and DCT bases need ``reference`` (e.g. the previous
    round's aggregated update or a server-side gradient estimate) of the parameter's shape.
    """
    shape = (int(shape[0]), int(shape[1]))
    projector = make_projector(kind, rank, update_gap=0, seed=derive_seed(seed, server_round, name), **options)
    if reference is None:
        if kind in _NEEDS_REFERENCE:
            raise ValueError(f"a {kind!r} round projector needs a reference matrix to take its basis from")
        reference = torch.zeros(shape, dtype=dtype)  # seed-only kinds use just the shape and dtype
    if tuple(reference.shape) != shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)}, parameter {name!r} has {shape}")
    projector.refresh(reference.to(dtype), server_round)
    return projector


def round_projectors(
    params: Mapping[str, torch.Tensor],
    kind: str,
    rank: int,
    seed: int,
    server_round: int,
    references: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> dict[str, Projector]:
    """:func:`round_projector` for every 2-D tensor in ``params`` (name -> current global weight)."""
    out = {}
    for name, weight in params.items():
        if weight.dim() != 2:
            raise ValueError(f"parameter {name!r} is not 2-D (shape {tuple(weight.shape)})")
        reference = None if references is None else references.get(name)
        out[name] = round_projector(
            kind, weight.shape, rank, seed, server_round, name, reference, weight.dtype, **options
        )
    return out


def projectors_to_wire(projectors: Mapping[str, Projector]) -> dict[str, dict[str, Any]]:
    """What the server broadcasts: each projector's compact state."""
    return {name: projector.compact_state() for name, projector in projectors.items()}


def projectors_from_wire(
    states: Mapping[str, dict[str, Any]], device: torch.device | str | None = None
) -> dict[str, Projector]:
    """Client side: rebuild the round's projectors (fixed bases) from the broadcast compact states."""
    out = {}
    for name, state in states.items():
        projector = projector_from_state({**state, "update_gap": 0}, device)
        out[name] = projector
    return out


def client_projected_updates(
    projectors: Mapping[str, Projector],
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Client: down(after − before) for every projected parameter (what it uploads)."""
    return {name: projector.down(after[name] - before[name]) for name, projector in projectors.items()}


def _normalized(weights: Sequence[float], count: int) -> list[float]:
    if len(weights) != count:
        raise ValueError(f"{count} updates but {len(weights)} weights")
    total = float(sum(weights))
    if count == 0 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("need at least one update and non-negative weights with a positive sum")
    return [float(w) / total for w in weights]


def aggregate_projected(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Server: the weighted average Σ_k w_k L_k of the clients' projected updates (weights normalised)."""
    coefficients = _normalized(weights, len(updates))
    out = {}
    for name in updates[0]:
        total = sum(c * update[name].to(torch.float64) for c, update in zip(coefficients, updates, strict=True))
        out[name] = total.to(updates[0][name].dtype)  # type: ignore[union-attr]
    return out


def projected_average(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], projectors: Mapping[str, Projector]
) -> dict[str, torch.Tensor]:
    """Server: the full-space update up(Σ_k w_k L_k) of every projected parameter, in float64 (W ← W + this)."""
    return {
        name: projectors[name].up(low.to(torch.float64)) for name, low in aggregate_projected(updates, weights).items()
    }


def projected_upload_bytes(projectors: Mapping[str, Projector], element_size: int = 4) -> tuple[int, int]:
    """(projected, dense) bytes one client uploads for these parameters."""
    projected = dense = 0
    for projector in projectors.values():
        rows, cols = projector.low_rank_shape()
        m, n = projector.shape or (0, 0)
        projected += rows * cols * element_size
        dense += m * n * element_size
    return projected, dense


__all__ = [
    "aggregate_projected",
    "client_projected_updates",
    "projected_average",
    "projected_upload_bytes",
    "projectors_from_wire",
    "projectors_to_wire",
    "round_projector",
    "round_projectors",
]
