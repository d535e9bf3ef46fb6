"""FlexLoRA (Bai et al., NeurIPS 2024): SVD of the average product, truncated to the adapter rank.

M* = Σ_k p_k B_k A_k = U S Vᵀ;  B ← U[:, :r]·S[:r], A ← Vᵀ[:r]. The SVD is taken through the stacked
factors (rank ≤ Σ r_k), never forming the dense matrix. The only aggregation bias is the truncation error
‖M* − M*_r‖. Every client gets the same rank here (heterogeneous ranks are not supported yet).
"""

from __future__ import annotations

from fedlowrank.adapters import LayerFactors
from fedlowrank.lowrank import truncated_svd_of_sum
from strategies.common import MethodSpec, RoundInput, ServerUpdate

SPEC = MethodSpec(name="flexlora")


def server_update(inputs: RoundInput) -> ServerUpdate:
    factors = {}
    for layer, previous in inputs.previous.items():
        rank = previous.A.shape[0]
        pairs = [(client[layer].B, client[layer].A) for client in inputs.clients]
        b_new, a_new = truncated_svd_of_sum(pairs, inputs.weights, rank)
        factors[layer] = LayerFactors(A=a_new, B=b_new)
    return ServerUpdate(factors=factors)
