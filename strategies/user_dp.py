"""User-level DP on the server (DP-FedAvg, McMahan et al. 2018): one mechanism for every method.

Before a method's math sees a round's replies they pass through the strategy's ``privacy`` object, chosen
once per run: ``NoUserDP`` hands them on unchanged (pfl-research's ``NoPrivacy``); ``UserLevelDP`` clips each
client's update (what it uploaded minus what the server holds, jointly over its tensors) to S, averages the
clipped updates with equal weights and adds N(0, (zS/m)²), and gives the method a single pseudo-client: the
server's state plus that noisy mean. For methods whose math needs M* = Σ p_k B_k A_k and not only the mean
factors (a correction towards M*), each client's product change B_k A_k − BA joins its update, so a noisy M* is released
with the same noise scale. Everything the method computes from these is post-processing of one Gaussian
mechanism per round, which ``UserLevelLedger`` composes over rounds (no amplification from client sampling
is claimed: the server's client sampling is neither secret nor Poisson). Which mode a method needs (or that it has none)
is part of its registration (``user_dp=``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fedlowrank.config import RunConfig
from fedlowrank.factors import LayerFactors, lora_factors
from fedlowrank.privacy.accounting import PrivacyAccountant
from fedlowrank.privacy.user_level import UserLevelLedger, noisy_mean
from strategies.method import UserDPMode

PRODUCT_SUFFIX = ".product"


@dataclass
class ClientUpdates:
    """What a round's accepted clients sent, as the method's math will see it."""

    uploads: list[dict[str, torch.Tensor]]
    factors: list[dict[str, LayerFactors]]
    weights: torch.Tensor
    target_products: dict[str, torch.Tensor] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class UpdatePrivacy(Protocol):
    active: bool

    def privatize(
        self, updates: ClientUpdates, server_state: dict[str, torch.Tensor], previous: dict[str, LayerFactors]
    ) -> ClientUpdates: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...  # what a checkpoint keeps (ledger, noise generator)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class NoUserDP:
    """The clients' updates go to the method as they are."""

    active = False

    def privatize(
        self, updates: ClientUpdates, server_state: dict[str, torch.Tensor], previous: dict[str, LayerFactors]
    ) -> ClientUpdates:
        return updates

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class UserLevelDP:
    """DP-FedAvg's clip, mean and noise before the method's math (see the module docstring)."""

    active = True

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        ledger: UserLevelLedger,
        mode: UserDPMode = UserDPMode(),
        generator: torch.Generator | None = None,
    ) -> None:
        self.noise_multiplier, self.clip_norm, self.ledger, self.mode = noise_multiplier, clip_norm, ledger, mode
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @classmethod
    def from_config(cls, config: RunConfig, mode: UserDPMode) -> UserLevelDP:
        dp = config.dp
        ledger = UserLevelLedger(dp.user_noise_multiplier, 1.0, dp.user_delta, dp.accountant)
        generator = torch.Generator().manual_seed(config.seed)
        return cls(dp.user_noise_multiplier, dp.user_clip_norm, ledger, mode, generator)

    def privatize(
        self, updates: ClientUpdates, server_state: dict[str, torch.Tensor], previous: dict[str, LayerFactors]
    ) -> ClientUpdates:
        deltas = []
        for upload, factors in zip(updates.uploads, updates.factors, strict=True):
            delta = {key: value.double() - server_state[key].double() for key, value in upload.items()}
            if self.mode.with_products:
                for layer, pair in factors.items():
                    before = previous[layer].B.double() @ previous[layer].A.double()
                    delta[layer + PRODUCT_SUFFIX] = pair.B.double() @ pair.A.double() - before
            deltas.append(delta)
        mean, _norms = noisy_mean(deltas, self.clip_norm, self.noise_multiplier, self.generator)
        pseudo = {
            key: (server_state[key].double() + mean[key]).to(server_state[key].dtype) for key in updates.uploads[0]
        }
        targets = None
        if self.mode.with_products:
            targets = {
                layer: previous[layer].B.double() @ previous[layer].A.double() + mean[layer + PRODUCT_SUFFIX]
                for layer in previous
            }
        return ClientUpdates(
            uploads=[pseudo],
            factors=[lora_factors(pseudo, fill_from=previous)],
            weights=torch.ones(1, dtype=torch.float64),
            target_products=targets,
            metrics={"user_dp_epsilon": self.ledger.release()},
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The ledger's history and the noise generator's position: a resumed run draws the noise it would have."""
        return {"ledger": self.ledger.accountant.to_tensor(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ledger.accountant = PrivacyAccountant.from_tensor(state["ledger"], self.ledger.accountant.kind)
        self.generator.set_state(state["generator"])
