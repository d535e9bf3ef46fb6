"""User-level DP on the server: Flower's DP wrapper where it fits, the same mechanism where it does not.

- FedAvg-LoRA, FFA-LoRA and FedSA-LoRA send and receive the same keys, so Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` applies as is: it clips each reply against what was
  broadcast and adds N(0, (zS/m)²) to the aggregate (``FlowerUserDP`` below also hands the noisy
  aggregate back to the strategy, so evaluation and the saved adapter are the private ones).
- FedSVD (uploads B, broadcasts a re-factorized A and B) and LoRA-FAIR (whose M* = Σ p_k B_k A_k is not a
  function of the averages) get ``UserDP``: each client's update — its uploaded tensors minus the
  broadcast ones, and for LoRA-FAIR also its product change B_k A_k − B A per layer — is clipped jointly
  to S; the uniform mean gets the same noise; the method's math then runs on that noisy mean (and noisy
  M*), which is post-processing of one Gaussian mechanism per round.
Either way the server composes ε over rounds (``UserLevelLedger``; no amplification from client sampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedlowrank.adapters import LayerFactors
from fedlowrank.privacy.user_level import UserLevelLedger, noisy_mean

FLOWER_WRAPPED = ("fedit", "ffa", "fedsa")
OWN_MECHANISM = ("fedsvd", "lora-fair")
PRODUCT_SUFFIX = ".product"


@dataclass
class UserDP:
    noise_multiplier: float
    clip_norm: float
    ledger: UserLevelLedger
    with_products: bool = False  # LoRA-FAIR: release a noisy M* too
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def privatize(
        self,
        states: list[dict[str, torch.Tensor]],
        broadcast: dict[str, torch.Tensor],
        clients: list[dict[str, LayerFactors]],
        previous: dict[str, LayerFactors],
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]:
        """One noisy pseudo-client state (broadcast + noisy mean update) and, if asked, noisy products."""
        updates = []
        for state, factors in zip(states, clients, strict=True):
            update = {k: v.double() - broadcast[k].double() for k, v in state.items()}
            if self.with_products:
                for layer, pair in factors.items():
                    before = previous[layer].B.double() @ previous[layer].A.double()
                    update[layer + PRODUCT_SUFFIX] = pair.B.double() @ pair.A.double() - before
            updates.append(update)
        mean, _norms = noisy_mean(updates, self.clip_norm, self.noise_multiplier, self.generator)
        pseudo = {k: (broadcast[k].double() + mean[k]).to(broadcast[k].dtype) for k in states[0]}
        if not self.with_products:
            return [pseudo], None
        targets = {
            layer: previous[layer].B.double() @ previous[layer].A.double() + mean[layer + PRODUCT_SUFFIX]
            for layer in previous
        }
        return [pseudo], targets


class FlowerUserDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper around a ``LoRAStrategy``, with ε accounting."""

    def __init__(self, strategy: Any, noise_multiplier: float, clip_norm: float, num_sampled: int, ledger) -> None:
        super().__init__(strategy, noise_multiplier, clip_norm, num_sampled)
        self.ledger = ledger

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies: list[Message] = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.strategy.adopt_broadcast(arrays)
            self.strategy.round_info["user_dp_epsilon"] = self.ledger.release()
        return arrays, metrics

    def __getattr__(self, name: str) -> Any:
        # The round loop reads the method's spec, round_info, broadcast_record(), ... from the strategy.
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)
