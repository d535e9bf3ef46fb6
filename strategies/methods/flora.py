"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge them into W0, start afresh.

[B_1 … B_K]·[p_1 A_1; …; p_K A_K] = Σ_k p_k B_k A_k = M*, so merging the stack into the frozen weight
(W0 ← W0 + s·M*) is exact. Every round the clients then get a fresh adapter: A re-drawn from the run seed
and the round (peft's kaiming-uniform bound 1/√d_in), B = 0. Downlink: the merged residual plus the fresh
A (B is zero). Heterogeneous ranks (``lora.client-ranks``): a rank-r_k client trains and uploads the leading
r_k components; the server zero-pads them, so the stack is still exactly Σ_k p_k B_k A_k.
"""

from __future__ import annotations

import torch

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import stacked_factors
from strategies.method import NO_OPTIONS, MethodSpec, NoOptions, RoundInput, ServerUpdate, register_method


def fresh_a(shape: tuple[int, int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)


@register_method("flora", spec=MethodSpec(heterogeneous_ranks=True), user_dp=None)
def server_update(inputs: RoundInput, options: NoOptions = NO_OPTIONS) -> ServerUpdate:
    generator = torch.Generator().manual_seed(inputs.seed * 1_000_003 + inputs.server_round)
    factors, fold = {}, {}
    for layer, previous in inputs.previous.items():
        b_stack, a_stack = stacked_factors([(c[layer].B, c[layer].A) for c in inputs.clients], inputs.weights)
        fold[layer] = inputs.scale * (b_stack @ a_stack)
        factors[layer] = LayerFactors(
            A=fresh_a(tuple(previous.A.shape), generator, previous.A.dtype), B=torch.zeros_like(previous.B)
        )
    return ServerUpdate(factors=factors, fold=fold)
