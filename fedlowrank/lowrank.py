"""Exact linear algebra on low-rank products B·A without forming the dense d_out x d_in matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def refactorize_product(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite M = B·A (B: d_out x r, A: r x d_in) as B_new·A_new with orthonormal rows in A_new.

    Thin QR of both factors, then an r x r SVD of the core: B = Q_B R_B, Aᵀ = Q_A R_A,
    R_B R_Aᵀ = U S Vᵀ  =>  M = (Q_B U S)(Q_A V)ᵀ, so B_new = Q_B U S and A_new = (Q_A V)ᵀ.
    Cost O((d_in + d_out) r²) instead of a dense SVD. All of S goes to B (FedSVD's convention).
    Each component's sign is fixed (the largest-magnitude entry of its column of B is positive): an SVD
    leaves it free, so float rounding could otherwise flip it between machines and change what clients
    train from (the product is the same, noisy DP-SGD steps are not). Float64 inside, inputs' dtype out.
    """
    dtype = B.dtype
    q_b, r_b = torch.linalg.qr(B.to(torch.float64))
    q_a, r_a = torch.linalg.qr(A.to(torch.float64).T)
    # full_matrices=False: a stacked rank above min(d_out, d_in) leaves a rectangular core
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    left, right = q_b @ u, q_a @ vh.T
    largest = left.abs().argmax(dim=0, keepdim=True)
    signs = torch.where(left.gather(0, largest) < 0, -1.0, 1.0).to(torch.float64)
    B_new = left * signs * s
    A_new = (right * signs).T
    return B_new.to(dtype), A_new.to(dtype)


def stacked_factors(
    products: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B_1 … B_K], [w_1 A_1; …; w_K A_K]) in float64: their product is Σ_k w_k B_k A_k exactly."""
    if len(products) != len(weights):
        raise ValueError(f"{len(products)} factor pairs but {len(weights)} weights")
    stacked_b = torch.cat([b for b, _ in products], dim=1).to(torch.float64)
    stacked_a = torch.cat([a for _, a in products], dim=0).to(torch.float64)
    # each client's rows of A scaled by its weight, in one product (hundreds of clients a round)
    ranks = torch.tensor([a.shape[0] for _, a in products])
    row_weights = torch.as_tensor(weights, dtype=torch.float64).repeat_interleave(ranks)
    return stacked_b, stacked_a * row_weights.unsqueeze(1)


def ideal_product(clients: Sequence[Any], weights: torch.Tensor) -> torch.Tensor:
    """M* = Σ_k p_k B_k A_k of clients' ``LayerFactors`` (ranks may differ), float64, through the stack."""
    stacked_b, stacked_a = stacked_factors([(c.B, c.A) for c in clients], weights)
    return stacked_b @ stacked_a


def product(factors: Any) -> torch.Tensor:
    """B·A of one layer's ``LayerFactors``, in float64."""
    return factors.B.to(torch.float64) @ factors.A.to(torch.float64)


def truncated_svd_of_sum(
    products: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (B, A) of M = Σ_k w_k B_k A_k, through the stacked factors.

    Σ_k w_k B_k A_k = [B_1 … B_K]·[w_1 A_1; …; w_K A_K] is a product of rank ≤ Σ r_k, so the exact
    refactorization above gives its SVD without the dense matrix; the leading ``rank`` terms are kept.
    """
    B_full, A_full = refactorize_product(*stacked_factors(products, weights))
    dtype = products[0][0].dtype
    return B_full[:, :rank].to(dtype).contiguous(), A_full[:rank].to(dtype).contiguous()


def pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a rank-r_k pair to ``rank`` (B gains zero columns, A zero rows): the product is unchanged."""
    r_k = A.shape[0]
    if r_k > rank:
        raise ValueError(f"factors of rank {r_k} exceed the global rank {rank}")
    if r_k == rank:
        return B, A
    return (
        torch.cat([B, B.new_zeros(B.shape[0], rank - r_k)], dim=1),
        torch.cat([A, A.new_zeros(rank - r_k, A.shape[1])], dim=0),
    )


# ---- averaging -------------------------------------------------------------------------------------------------
def client_weights(num_examples: Sequence[int | float], weighting: str = "num-examples") -> torch.Tensor:
    """p_k = n_k / sum n ("num-examples") or 1/K ("uniform"), in float64."""
    counts = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if weighting == "uniform":
        return torch.full_like(counts, 1.0 / len(counts))
    if weighting != "num-examples":
        raise ValueError(f"unknown weighting {weighting!r}")
    if counts.sum() <= 0:
        raise ValueError("all clients reported zero examples; cannot weight by example count")
    return counts / counts.sum()


def weighted_average(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k T_k, accumulated in float64 and returned in the inputs' dtype."""
    stacked = torch.stack(list(tensors)).to(torch.float64)  # one conversion for all (hundreds of clients)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (weights.to(torch.float64).view(shape) * stacked).sum(dim=0).to(tensors[0].dtype)
