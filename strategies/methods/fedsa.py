"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B local.

Clients train A and B and upload only A; the server averages A and broadcasts Ā. Every client keeps
**its own** B (and, by default, its own classifier head) across rounds in its persistent client state;
a client seen for the first time starts from B = 0. (The official configuration shares one model
object, so its "local" B is one B trained cyclically through the clients; see algorithms.md.)

rsLoRA: the same protocol with ``lora.use-rslora = true`` (s = α/√r).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import weighted_average
from strategies.method import MethodOptions, MethodSpec, RoundInput, ServerUpdate, option, register_method


@dataclass(frozen=True)
class FedSAOptions(MethodOptions):
    local_head: bool = option(True, "keep the classifier head local too, not only B (the paper's GLUE setting)")

    def adjust_spec(self, spec: MethodSpec) -> MethodSpec:
        return replace(spec, local_head=self.local_head)


@register_method(
    "fedsa",
    spec=MethodSpec(upload=("A",), download=("A",), local_b=True),
    options=FedSAOptions,
    aliases=("fedsa-lora",),
)
def server_update(inputs: RoundInput, options: FedSAOptions = FedSAOptions()) -> ServerUpdate:
    """Ā = Σ_k p_k A_k; B is not the server's (kept at its previous value, never broadcast)."""
    return ServerUpdate(
        factors={
            layer: LayerFactors(
                A=weighted_average([client[layer].A for client in inputs.clients], inputs.weights), B=previous.B
            )
            for layer, previous in inputs.previous.items()
        }
    )
