"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT plus the exact residual folded into the frozen weight.

W0 ← W0 + s·(M* − B̄Ā) with M* = Σ_k p_k B_k A_k, so the effective weight W0 + s·B̄Ā equals the
average of the clients' effective weights. The residual is in the layer's product orientation
(d_out x d_in); clients transpose it only for layers stored transposed (``fan_in_fan_out``), the
orientation bug of the official code. Downlink: Ā, B̄ and the dense residual.
"""

from __future__ import annotations

from fedlowrank.lowrank import ideal_product, product
from strategies.method import NO_OPTIONS, MethodSpec, NoOptions, RoundInput, ServerUpdate, register_method
from strategies.methods.fedit import average_factors


@register_method("fedex", spec=MethodSpec(), aliases=("fedex-lora",), user_dp=None)
def server_update(inputs: RoundInput, options: NoOptions = NO_OPTIONS) -> ServerUpdate:
    factors = average_factors(inputs.clients, inputs.weights)
    fold = {
        layer: inputs.scale
        * (ideal_product([client[layer] for client in inputs.clients], inputs.weights) - product(pair))
        for layer, pair in factors.items()
    }
    return ServerUpdate(factors=factors, fold=fold)
