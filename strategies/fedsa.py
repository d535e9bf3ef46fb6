"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B local.

Clients train A and B and upload only A; the server averages A and broadcasts Ā. Every client keeps
**its own** B (and, by default, its own classifier head) across rounds in its persistent client state;
a client seen for the first time starts from B = 0. (The official configuration shares one model
object, so its "local" B is one B trained cyclically through the clients; see algorithms.md.)

rsLoRA: the same protocol with ``lora.use-rslora = true`` (s = α/√r).
"""

from __future__ import annotations

from fedlowrank.adapters import LayerFactors
from strategies.common import MethodSpec, RoundInput, ServerUpdate, weighted_average

SPEC = MethodSpec(name="fedsa", upload_b=False, download_b=False, local_b=True)


def server_update(inputs: RoundInput) -> ServerUpdate:
    """Ā = Σ_k p_k A_k; B is not the server's (kept at its previous value, never broadcast)."""
    return ServerUpdate(
        factors={
            layer: LayerFactors(
                A=weighted_average([client[layer].A for client in inputs.clients], inputs.weights), B=previous.B
            )
            for layer, previous in inputs.previous.items()
        }
    )
