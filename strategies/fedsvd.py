"""FedSVD (Lee et al., NeurIPS 2025): clients train B only; the server re-factorizes B̄·A with an SVD.

Server, per layer: B̄ = Σ_k p_k B_k, then (every ``period`` rounds) M = B̄·A_prev = U S Vᵀ and
A ← Vᵀ[:r] (orthonormal rows), B ← U[:, :r]·S[:r] — all of S goes to B, as in the official code. The SVD is
the exact QR-based one (``fedlowrank.lowrank.refactorize_product``), O((d_in + d_out)·r²). The product is
unchanged, so there is no aggregation bias. The server broadcasts A and B.
"""

from __future__ import annotations

from fedlowrank.adapters import LayerFactors
from fedlowrank.lowrank import refactorize_product
from strategies.common import MethodSpec, RoundInput, ServerUpdate, weighted_average

SPEC = MethodSpec(name="fedsvd", train_a=False, upload_a=False)


def server_update(inputs: RoundInput, period: int = 1) -> ServerUpdate:
    refactorize = period > 0 and inputs.server_round % period == 0
    factors = {}
    for layer, previous in inputs.previous.items():
        b_bar = weighted_average([client[layer].B for client in inputs.clients], inputs.weights)
        if refactorize:
            b_new, a_new = refactorize_product(b_bar, previous.A)
            factors[layer] = LayerFactors(A=a_new, B=b_new)
        else:
            factors[layer] = LayerFactors(A=previous.A, B=b_bar)
    return ServerUpdate(factors=factors)
