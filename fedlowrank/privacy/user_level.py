"""User-level DP (DP-FedAvg, McMahan et al. 2018) math, free of Flower.

Each client's update (what it uploads minus what it was sent) is clipped to L2 norm S over all of its
tensors jointly; the server averages the clipped updates with equal weights and adds N(0, (zS/m)²) to
the mean (std zS on the sum, Flower's convention). Every round is one subsampled Gaussian mechanism
with noise multiplier z; ``UserLevelLedger`` composes them (no amplification unless asked: client
sampling in FedAvg is not secret and not Poisson).
"""

from __future__ import annotations

import math

import torch

from fedlowrank.privacy.accounting import PrivacyAccountant


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """The update scaled to norm ≤ ``clip_norm`` (jointly over all tensors); returns it and its norm."""
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    factor = min(1.0, clip_norm / (norm + 1e-12))
    return {k: t * factor for k, t in update.items()}, norm


def noisy_mean(
    updates: list[dict[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Uniform mean of the clipped updates plus Gaussian noise of std zS/m; also the pre-clip norms."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    clipped, norms = zip(*(clip_update(u, clip_norm) for u in updates), strict=True)
    m = len(updates)
    std = noise_multiplier * clip_norm / m
    mean = {}
    for key in updates[0]:
        total = torch.stack([c[key].double() for c in clipped]).sum(dim=0) / m
        if std > 0:
            total = total + std * torch.randn(total.shape, generator=generator, dtype=torch.float64)
        mean[key] = total
    return mean, list(norms)


class UserLevelLedger:
    """ε of the released aggregates, one Gaussian mechanism (z, q) per round."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, kind: str = "prv") -> None:
        self.noise_multiplier, self.sample_rate, self.delta = noise_multiplier, sample_rate, delta
        self.accountant = PrivacyAccountant(kind)

    def release(self) -> float:
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)
