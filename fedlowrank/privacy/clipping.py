"""DP-SGD's clip-and-noise, in one place: per-example clipping, summed per client, and Gaussian noise.

Opacus' flat clipping: example n's gradient over all trainable tensors jointly is scaled by
min(1, C / (‖∇_n‖ + 1e-6)). The batched engine sums the clipped gradients per client (each with its own C);
one client alone is the case of a single owner. Noise N(0, σ²C²) is added to each client's sum from that
client's own generator, then the sum is divided by its *expected* batch size.
"""

from __future__ import annotations

import torch


def clipped_sums(
    samples: list[torch.Tensor], owner: torch.Tensor, clip: torch.Tensor, num_owners: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per owner k and tensor: Σ_{n: owner_n = k} c_n ∇_n (shape (num_owners, ...)); and the per-example norms.

    ``samples``: per-example gradients (n, ...) of each trainable tensor; ``clip``: C per owner.
    """
    count = owner.shape[0]
    norms = torch.stack([s.reshape(count, -1).norm(2, dim=1) for s in samples], dim=1).norm(2, dim=1)
    factors = (clip[owner] / (norms + 1e-6)).clamp(max=1.0)
    sums = []
    for sample in samples:
        clipped = sample * factors.view(-1, *([1] * (sample.dim() - 1))).to(sample.dtype)
        sums.append(sample.new_zeros((num_owners, *sample.shape[1:])).index_add_(0, owner, clipped))
    return sums, norms


def noisy_mean_(total: torch.Tensor, std: float, expected_batch_size: float, generator: torch.Generator | None) -> None:
    """In place: total ← (total + N(0, std²)) / E[b] (the noise drawn in ``total``'s shape from ``generator``)."""
    if std > 0:
        total += torch.normal(0.0, std, size=total.shape, device=total.device, generator=generator)
    total /= expected_batch_size
