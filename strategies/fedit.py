"""FedIT / FedAvg-LoRA: average A and B separately (Zhang et al., 2024).

    A <- sum_k p_k A_k,   B <- sum_k p_k B_k

The broadcast product B̄Ā differs from the average of the clients' products sum_k p_k B_k A_k by
sum_k p_k (B_k - B̄)(A_k - Ā): this is the aggregation bias the other methods remove.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlowrank.adapters import LayerFactors


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in float64 and returned in the inputs' dtype."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (weights.to(torch.float64).view(shape) * stacked).sum(dim=0).to(tensors[0].dtype)


def aggregate(client_factors: Sequence[dict[str, LayerFactors]], weights: torch.Tensor) -> dict[str, LayerFactors]:
    """FedIT: per layer, Ā = sum_k p_k A_k and B̄ = sum_k p_k B_k (weights sum to one)."""
    layers = client_factors[0].keys()
    return {
        layer: LayerFactors(
            A=weighted_average([client[layer].A for client in client_factors], weights),
            B=weighted_average([client[layer].B for client in client_factors], weights),
        )
        for layer in layers
    }
