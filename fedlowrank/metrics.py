"""Aggregation bias and personalisation gap (definitions in shared/reference/algorithms.md, section 1).

All products are formed in float64. ``M*`` is the FedAvg-on-full-weights target Σ_k p_k B_k A_k; the
broadcast product includes anything folded into the frozen weight (divided by the LoRA scale s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import ideal_product


def _relative(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    denominator_norm = float(torch.linalg.matrix_norm(denominator))
    if denominator_norm == 0.0:
        return 0.0 if float(torch.linalg.matrix_norm(numerator)) == 0.0 else float("inf")
    return float(torch.linalg.matrix_norm(numerator)) / denominator_norm


@dataclass
class LayerBias:
    bias_rel: float  # ‖M* − M_bcast‖ / ‖M*‖
    bias_round_rel: float  # ‖M* − M_bcast‖ / ‖M* − M_prev‖


def layer_bias(
    clients: Sequence[LayerFactors],
    weights: torch.Tensor,
    broadcast: torch.Tensor,
    previous: torch.Tensor,
) -> LayerBias:
    """``broadcast`` and ``previous`` are effective products (factors plus folded residual / s).

    ``clients`` hold each client's effective factors relative to the same previous folded residual, so
    M* and the products compare like with like.
    """
    target = ideal_product(clients, weights)
    gap = target - broadcast
    return LayerBias(bias_rel=_relative(gap, target), bias_round_rel=_relative(gap, target - previous))


def personalization_gap(B_k: torch.Tensor, A_shared: torch.Tensor, A_k: torch.Tensor) -> float:
    """FedSA: ‖B_k Ā − B_k A_k‖_F / ‖B_k A_k‖_F (0 when B_k = 0)."""
    b = B_k.to(torch.float64)
    local = b @ A_k.to(torch.float64)
    return _relative(b @ (A_shared.to(torch.float64) - A_k.to(torch.float64)), local)


def summarize(per_layer: dict[str, float]) -> dict[str, float]:
    values = [v for v in per_layer.values() if v == v]  # drop NaN
    if not values:
        return {"mean": float("nan"), "max": float("nan")}
    return {"mean": sum(values) / len(values), "max": max(values)}
