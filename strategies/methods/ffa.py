"""FFA-LoRA (Sun et al., ICLR 2024): A random, frozen and identical on every client; B trained and averaged.

A comes from the run seed (the same peft initialisation in every process); each client sends the
SHA-256 of its A and the server drops any client whose A differs. B starts at zero. Since A is shared,
B̄·A = Σ_k p_k B_k A exactly: no aggregation bias.
"""

from __future__ import annotations

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import weighted_average
from strategies.method import NO_OPTIONS, MethodSpec, NoOptions, RoundInput, ServerUpdate, register_method

SPEC = MethodSpec(train=("B",), upload=("B",), download=("B",), check_shared_a=True)


@register_method("ffa", spec=SPEC, aliases=("ffa-lora",))
def server_update(inputs: RoundInput, options: NoOptions = NO_OPTIONS) -> ServerUpdate:
    """B̄ = Σ_k p_k B_k with the shared A unchanged."""
    return ServerUpdate(
        factors={
            layer: LayerFactors(
                A=previous.A, B=weighted_average([client[layer].B for client in inputs.clients], inputs.weights)
            )
            for layer, previous in inputs.previous.items()
        }
    )
