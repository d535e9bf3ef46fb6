"""FlexLoRA (Bai et al., NeurIPS 2024): SVD of the average product, truncated to the adapter rank.

M* = Σ_k p_k B_k A_k = U S Vᵀ;  B ← U[:, :r]·S[:r], A ← Vᵀ[:r]. The SVD is taken through the stacked
factors (rank ≤ Σ r_k), never forming the dense matrix. The only aggregation bias is the truncation error
‖M* − M*_r‖. Heterogeneous ranks (``lora.client-ranks``): clients of rank r_k upload r_k components (zero-
padded on the server) and keep the leading r_k components of the broadcast — the best rank-r_k
approximation of M* (Eckart–Young), FlexLoRA's per-client truncation.
"""

from __future__ import annotations

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import pad_rank, truncated_svd_of_sum
from strategies.method import NO_OPTIONS, MethodSpec, NoOptions, RoundInput, ServerUpdate, register_method


@register_method("flexlora", spec=MethodSpec(heterogeneous_ranks=True), user_dp=None)
def server_update(inputs: RoundInput, options: NoOptions = NO_OPTIONS) -> ServerUpdate:
    factors = {}
    for layer, previous in inputs.previous.items():
        rank = previous.A.shape[0]
        pairs = [(client[layer].B, client[layer].A) for client in inputs.clients]
        # pad: with low client ranks, M* may have fewer than r components
        b_new, a_new = pad_rank(*truncated_svd_of_sum(pairs, inputs.weights, rank), rank)
        factors[layer] = LayerFactors(A=a_new, B=b_new)
    return ServerUpdate(factors=factors)
