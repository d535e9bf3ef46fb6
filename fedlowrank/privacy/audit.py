"""An empirical lower bound on ε from one DP-SGD run, to set beside the accountant's ε.

The one-run audit of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023):
m canaries are each put into the training set independently with probability 1/2; after training, the auditor
guesses the k+ highest-scoring canaries "in" and the k- lowest "out", abstaining on the rest. If the mechanism is
(ε, δ)-DP with respect to each canary, the number W of correct guesses out of r = k+ + k- is stochastically
dominated as in their Theorem 5.2:

    P[W ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2mδ · max_{1≤i≤v} (1/i) · P[v - i ≤ Binomial(r, p_ε) < v],
    with p_ε = e^ε / (1 + e^ε),

so every ε whose bound is below β is rejected, and the largest one rejected is a lower bound on ε with confidence
1 - β. Several guess counts are tried, each at β / (number tried) (Bonferroni), so picking the best is honest.

The canaries here are white-box gradient canaries (the paper's "Dirac" canaries): canary i's gradient is C·e_i on
its own coordinate of a parameter vector, trained among background examples whose gradients (norm C, random
directions) live on other coordinates, as the strongest auditor would place them. The run follows
a client's DP-SGD schedule exactly: Poisson rate q, T steps over the whole run, σ and C, through the same
mechanism the clients use (Opacus' DPOptimizer, or the batched engine's clip-and-noise), so a mechanism that adds
too little noise, clips wrongly or samples wrongly is caught. The score of canary i is its coordinate's total
noisy gradient Σ_t g_t[i] (what an observer of every update could compute).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import optimize, stats

from fedlowrank.privacy.accounting import ClientDPPlan, PrivacyAccountant
from fedlowrank.privacy.clipping import clipped_sums, noisy_mean_

MECHANISMS = ("opacus", "engine")
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 0.9)  # k+ = fraction · m / 2; k- = 0 or k+
BACKGROUND_DIMENSIONS = 8


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """P[≥ ``correct`` right of ``guesses``] for an (ε, δ)-DP mechanism and ``canaries`` canaries (Thm 5.2)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 ≤ correct ≤ guesses ≤ canaries, got {correct}, {guesses}, {canaries}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, p))
    # P[correct - i ≤ Bin < correct] for i = 1..correct, via the CDF; its largest average slope
    below = stats.binom.cdf(correct - 1, guesses, p) - stats.binom.cdf(
        correct - 1 - np.arange(1, correct + 1), guesses, p
    )
    slope = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * slope)


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, beta: float) -> float:
    """The largest ε that ``correct`` of ``guesses`` rejects at level ``beta`` (0 when none is rejected)."""
    if audit_p_value(canaries, guesses, correct, 0.0, delta) >= beta:
        return 0.0
    high = 1.0
    while audit_p_value(canaries, guesses, correct, high, delta) < beta:
        high *= 2
        if high > 1e3:  # every guess right and very many of them: report the cap
            return high
    return float(optimize.brentq(lambda e: audit_p_value(canaries, guesses, correct, e, delta) - beta, 0.0, high))


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float  # with confidence ``confidence``
    epsilon_accounted: float  # the accountant's ε for the same schedule
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    mechanism: str
    noise_disabled: bool

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def best_guesses(
    scores: np.ndarray, included: np.ndarray, delta: float, beta: float, fractions: Sequence[float] = GUESS_FRACTIONS
) -> tuple[float, int, int]:
    """Guess the top-k "in" (and the bottom-k "out", or none) for each k tried; the best bound, with the level
    split over every try (Bonferroni), so choosing the best is honest."""
    canaries, order = len(scores), np.argsort(-scores, kind="stable")
    tries = [(max(1, int(f * canaries / 2)), both) for f in fractions for both in (False, True)]
    best = (0.0, 0, 0)
    for k, both in tries:
        right = int(included[order[:k]].sum() + ((~included[order[-k:]]).sum() if both else 0))
        guesses = 2 * k if both else k
        bound = epsilon_lower_bound(canaries, guesses, right, delta, beta / len(tries))
        if bound > best[0]:
            best = (bound, guesses, right)
    return best


def _canary_run(
    plan: ClientDPPlan,
    dataset_size: int,
    included: np.ndarray,
    *,
    max_grad_norm: float,
    mechanism: str,
    noise: bool,
    seed: int,
) -> np.ndarray:
    """Train a parameter vector through the DP mechanism; return each coordinate's total noisy gradient."""
    canaries = len(included)
    steps = plan.steps_per_round * plan.planned_rounds
    sampler = torch.Generator().manual_seed(seed)
    noise_source = torch.Generator().manual_seed(seed + 1)
    member = torch.from_numpy(np.flatnonzero(included))
    sigma = plan.noise_multiplier if noise else 0.0
    width = canaries + BACKGROUND_DIMENSIONS
    weights = torch.nn.Parameter(torch.zeros(width, dtype=torch.float64))
    dp_optimizer = None
    if mechanism == "opacus":
        from opacus.optimizers import DPOptimizer

        dp_optimizer = DPOptimizer(
            torch.optim.SGD([weights], lr=1.0),
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction="mean",
            generator=noise_source,
        )
        dp_optimizer.expected_batch_size = plan.expected_batch_size
    for _ in range(steps):
        background = int((torch.rand(dataset_size, generator=sampler) < plan.sample_rate).sum())
        chosen = member[torch.rand(len(member), generator=sampler) < plan.sample_rate]
        rows = torch.zeros(background, width, dtype=torch.float64)
        rows[:, canaries:] = torch.randn(background, BACKGROUND_DIMENSIONS, generator=sampler, dtype=torch.float64)
        rows *= max_grad_norm / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)  # background: norm C
        dirac = torch.zeros(len(chosen), width, dtype=torch.float64)
        dirac[torch.arange(len(chosen)), chosen] = max_grad_norm
        per_example = torch.cat([rows, dirac, torch.zeros(1, width, dtype=torch.float64)])  # never empty
        if dp_optimizer is not None:
            weights.grad_sample = per_example
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
        else:
            owner = torch.zeros(len(per_example), dtype=torch.long)
            (total,), _ = clipped_sums([per_example], owner, torch.tensor([max_grad_norm], dtype=torch.float64), 1)
            noisy_mean_(total[0], sigma * max_grad_norm, plan.expected_batch_size, noise_source)
            with torch.no_grad():
                weights -= total[0]
    return -weights.detach().numpy()[:canaries]  # SGD at lr 1 from 0: minus the sum of the noisy gradients


def audit_dp_sgd(
    plan: ClientDPPlan,
    dataset_size: int,
    *,
    max_grad_norm: float,
    canaries: int = 1000,
    confidence: float = 0.95,
    mechanism: str = "opacus",
    seed: int = 0,
    disable_noise: bool = False,
) -> AuditResult:
    """Audit one client's DP-SGD schedule with ``canaries`` gradient canaries in one run.

    ``disable_noise`` is for testing the audit itself: the mechanism then adds no noise while the accountant still
    claims the plan's ε, and a working audit must report a lower bound above that claim.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if canaries < 10 or not 0.5 <= confidence < 1:
        raise ValueError(f"need ≥ 10 canaries and a confidence in [0.5, 1), got {canaries}, {confidence}")
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    scores = _canary_run(
        plan, dataset_size, included, max_grad_norm=max_grad_norm, mechanism=mechanism, noise=not disable_noise,
        seed=seed,
    )  # fmt: skip
    bound, guesses, correct = best_guesses(scores, included, plan.delta, 1 - confidence)
    steps = plan.steps_per_round * plan.planned_rounds
    accountant = PrivacyAccountant(plan.accountant)
    accountant.step(plan.noise_multiplier, plan.sample_rate, steps)
    return AuditResult(
        epsilon_lower_bound=bound,
        epsilon_accounted=accountant.epsilon(plan.delta),
        delta=plan.delta,
        confidence=confidence,
        canaries=canaries,
        included=int(included.sum()),
        guesses=guesses,
        correct=correct,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        max_grad_norm=max_grad_norm,
        mechanism=mechanism,
        noise_disabled=disable_noise,
    )


__all__ = ["AuditResult", "MECHANISMS", "audit_dp_sgd", "audit_p_value", "best_guesses", "epsilon_lower_bound"]
