"""LoRA-FAIR (Bian et al., ICCV 2025): average A and B, then correct B̄ towards the ideal product.

Server, per layer: Ā, B̄ and M* = Σ_k p_k B_k A_k; a correction ΔB so that (B̄ + ΔB)·Ā is close to M*;
broadcast Ā and B̄' = B̄ + ΔB. Two solvers:

- ``iterative`` (the paper): ΔB* = argmin 1 − cos(M*, (B̄ + ΔB)Ā) + λ‖ΔB‖², Adam from ΔB = 0 on the
  flattened cosine, stopping when the loss changes by < 1e-12 for 5 iterations;
- ``closed-form`` (ridge): argmin ‖M* − B'Ā‖² + λ‖B' − B̄‖²  =>  B̄' = (M*Āᵀ + λB̄)(ĀĀᵀ + λI)⁻¹. Since B' = B̄
  is feasible, its bias never exceeds FedIT's; ‖M*(I − P_Ā)‖ is irreducible by any B-only fix.

Both use only r-sized matrices: M*Āᵀ = Σ_k p_k B_k (A_k Āᵀ), ‖BĀ‖² = ⟨BĀĀᵀ, B⟩, ‖M*‖ via the stacked
factors, so the dense d_out x d_in product is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import stacked_factors
from strategies.method import MethodOptions, MethodSpec, RoundInput, ServerUpdate, UserDPMode, option, register_method
from strategies.methods.fedit import average_factors


@dataclass(frozen=True)
class LoRAFAIROptions(MethodOptions):
    solver: str = option(
        "closed-form",
        "'closed-form' (ridge: argmin ‖M* − B'Ā‖² + λ‖B' − B̄‖²) or 'iterative' (the paper's cosine objective)",
        choices=("closed-form", "iterative"),
    )
    lam: float = option(0.01, "λ, the weight of the correction's norm", key="lambda", minimum=0)
    iterations: int = option(300, "iterative solver: at most this many Adam steps", minimum=1)
    lr: float = option(0.01, "iterative solver: Adam's learning rate", minimum=0)


def _low_rank_terms(
    clients: list[LayerFactors], weights: torch.Tensor, a_bar: torch.Tensor, target: torch.Tensor | None = None
):
    """(M*Āᵀ, ĀĀᵀ, ‖M*‖_F) in float64 without the dense M* (or from a given dense M*)."""
    a_bar = a_bar.to(torch.float64)
    if target is not None:
        target = target.to(torch.float64)
        return target @ a_bar.T, a_bar @ a_bar.T, torch.linalg.matrix_norm(target)
    b_stack, a_stack = stacked_factors([(c.B, c.A) for c in clients], weights)  # M* = b_stack @ a_stack
    target_at = b_stack @ (a_stack @ a_bar.T)
    target_norm = torch.sqrt(((b_stack.T @ b_stack) * (a_stack @ a_stack.T)).sum().clamp(min=0))
    return target_at, a_bar @ a_bar.T, target_norm


def ridge_correction(
    clients: list[LayerFactors],
    weights: torch.Tensor,
    a_bar: torch.Tensor,
    b_bar: torch.Tensor,
    lam: float,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """B̄' = (M*Āᵀ + λB̄)(ĀĀᵀ + λI)⁻¹, float64."""
    target_at, gram, _ = _low_rank_terms(clients, weights, a_bar, target)
    rhs = target_at + lam * b_bar.to(torch.float64)
    system = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    # B' · system = rhs  <=>  systemᵀ · B'ᵀ = rhsᵀ (system is symmetric)
    return torch.linalg.solve(system, rhs.T).T


def cosine_objective(
    b: torch.Tensor,
    b_bar: torch.Tensor,
    target_at: torch.Tensor,
    gram: torch.Tensor,
    target_norm: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """1 − cos(M*, BĀ) + λ‖B − B̄‖² with the inner products in low-rank form."""
    inner = (b * target_at).sum()
    norm = torch.sqrt(((b @ gram) * b).sum().clamp(min=1e-300))
    return 1 - inner / (target_norm * norm) + lam * ((b - b_bar) ** 2).sum()


def iterative_correction(
    clients: list[LayerFactors],
    weights: torch.Tensor,
    a_bar: torch.Tensor,
    b_bar: torch.Tensor,
    lam: float,
    iterations: int = 300,
    lr: float = 0.01,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's solver: Adam on ΔB from zero, flattened cosine plus λ‖ΔB‖²."""
    target_at, gram, target_norm = _low_rank_terms(clients, weights, a_bar, target)
    b_bar64 = b_bar.to(torch.float64)
    if float(target_norm) == 0.0:
        return b_bar64
    delta = torch.zeros_like(b_bar64, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    last, still = None, 0
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = cosine_objective(b_bar64 + delta, b_bar64, target_at, gram, target_norm, lam)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        still = still + 1 if last is not None and abs(last - value) < 1e-12 else 0
        if still >= 5:
            break
        last = value
    return (b_bar64 + delta).detach()


@register_method(
    "lora-fair",
    spec=MethodSpec(),
    options=LoRAFAIROptions,
    aliases=("fair", "lorafair"),
    user_dp=UserDPMode(with_products=True),  # the correction needs M*, not only the mean factors
)
def server_update(inputs: RoundInput, options: LoRAFAIROptions = LoRAFAIROptions()) -> ServerUpdate:
    averaged = average_factors(inputs.clients, inputs.weights)
    factors = {}
    for layer, pair in averaged.items():
        clients = [client[layer] for client in inputs.clients]
        target = inputs.target_products.get(layer) if inputs.target_products else None
        if options.solver == "closed-form":
            b_new = ridge_correction(clients, inputs.weights, pair.A, pair.B, options.lam, target)
        else:
            b_new = iterative_correction(
                clients, inputs.weights, pair.A, pair.B, options.lam, options.iterations, options.lr, target
            )
        factors[layer] = LayerFactors(A=pair.A, B=b_new.to(pair.B.dtype))
    return ServerUpdate(factors=factors)
