"""FedIT / FedAvg-LoRA: average A and B separately (Zhang et al., 2024).

    A <- sum_k p_k A_k,   B <- sum_k p_k B_k

The broadcast product B̄Ā differs from the average of the clients' products sum_k p_k B_k A_k by
sum_k p_k (B_k - B̄)(A_k - Ā): this is the aggregation bias the other methods remove.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import weighted_average
from strategies.method import NO_OPTIONS, MethodSpec, NoOptions, RoundInput, ServerUpdate, register_method


def average_factors(
    client_factors: Sequence[dict[str, LayerFactors]], weights: torch.Tensor
) -> dict[str, LayerFactors]:
    """Per layer, Ā = sum_k p_k A_k and B̄ = sum_k p_k B_k (weights sum to one)."""
    return {
        layer: LayerFactors(
            A=weighted_average([client[layer].A for client in client_factors], weights),
            B=weighted_average([client[layer].B for client in client_factors], weights),
        )
        for layer in client_factors[0]
    }


@register_method("fedit", spec=MethodSpec(), aliases=("fedavg", "fedavg-lora"), default=True)
def server_update(inputs: RoundInput, options: NoOptions = NO_OPTIONS) -> ServerUpdate:
    return ServerUpdate(factors=average_factors(inputs.clients, inputs.weights))
