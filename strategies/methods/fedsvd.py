"""FedSVD (Lee et al., NeurIPS 2025): clients train B only; the server re-factorizes B̄·A with an SVD.

Server, per layer: B̄ = Σ_k p_k B_k, then (every ``period`` rounds) M = B̄·A_prev = U S Vᵀ and
A ← Vᵀ[:r] (orthonormal rows), B ← U[:, :r]·S[:r] — all of S goes to B, as in the official code. The SVD is
the exact QR-based one (``fedlowrank.lowrank.refactorize_product``), O((d_in + d_out)·r²). The product is
unchanged, so there is no aggregation bias. The server broadcasts A and B.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import refactorize_product, weighted_average
from strategies.method import MethodOptions, MethodSpec, RoundInput, ServerUpdate, option, register_method


@dataclass(frozen=True)
class FedSVDOptions(MethodOptions):
    period: int = option(
        1, "re-factorize B̄·A every this many rounds (0: never, i.e. FFA-LoRA with a sent A)", minimum=0
    )


@register_method("fedsvd", spec=MethodSpec(train=("B",), upload=("B",)), options=FedSVDOptions)
def server_update(inputs: RoundInput, options: FedSVDOptions = FedSVDOptions()) -> ServerUpdate:
    refactorize = options.period > 0 and inputs.server_round % options.period == 0
    factors = {}
    for layer, previous in inputs.previous.items():
        b_bar = weighted_average([client[layer].B for client in inputs.clients], inputs.weights)
        if refactorize:
            b_new, a_new = refactorize_product(b_bar, previous.A)
            factors[layer] = LayerFactors(A=a_new, B=b_new)
        else:
            factors[layer] = LayerFactors(A=previous.A, B=b_bar)
    return ServerUpdate(factors=factors)
