"""Privacy accounting for one client over a whole run, and σ calibration.

A client's guarantee composes every noisy step it ran in every round it joined, at its own sampling
rate q = b / n_k. ``PrivacyAccountant`` keeps that history as ``[(σ, q, steps)]``, is saved in the
client's persistent state after every round (never reset), and reports ε through Opacus' PRV
accountant (the upper bound of its estimate, so ε is never under-reported) or RDP (conservative).
``pld_epsilon`` recomputes ε with Google's dp-accounting PLD accountant, an independent check.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fedlowrank.config import RunConfig

ACCOUNTANTS = ("prv", "rdp")
PARTICIPATION = ("every-round", "expected")


class PrivacyBudgetExceeded(RuntimeError):
    """Training the next round would take a client past its (ε, δ) budget."""


@dataclass(frozen=True)
class Step:
    noise_multiplier: float
    sample_rate: float
    count: int


class PrivacyAccountant:
    """The DP-SGD history of one client: ``[(σ, q, steps)]``, merged when σ and q repeat."""

    def __init__(self, kind: str = "prv", history: Sequence[Step] = ()) -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
        self.kind = kind
        self.history: list[Step] = list(history)

    # ---- composition ---------------------------------------------------------------------------
    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        if count <= 0:
            return
        last = self.history[-1] if self.history else None
        if last is not None and last.noise_multiplier == noise_multiplier and last.sample_rate == sample_rate:
            self.history[-1] = Step(noise_multiplier, sample_rate, last.count + count)
        else:
            self.history.append(Step(float(noise_multiplier), float(sample_rate), int(count)))

    @property
    def steps(self) -> int:
        return sum(step.count for step in self.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative ε at ``delta`` (0 before any step; ∞ if any step had no noise)."""
        if not self.history:
            return 0.0
        if any(step.noise_multiplier <= 0 for step in self.history):
            return math.inf
        return opacus_epsilon(self.history, delta, self.kind)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, count: int, delta: float) -> float:
        """ε if ``count`` more steps at (σ, q) were taken: the budget check before a round."""
        trial = copy.deepcopy(self)
        trial.step(noise_multiplier, sample_rate, count)
        return trial.epsilon(delta)

    def optimizer_hook(self, noise_multiplier: float, sample_rate: float) -> Callable[[object], None]:
        """A DPOptimizer step hook: one accounted step per real (noisy) optimizer step."""

        def hook(_optimizer: object) -> None:
            self.step(noise_multiplier, sample_rate)

        return hook

    # ---- persistence (float64: a float32 round trip could shave q or σ and under-report ε) --------
    def to_tensor(self) -> torch.Tensor:
        rows = [[s.noise_multiplier, s.sample_rate, float(s.count)] for s in self.history]
        return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)

    @classmethod
    def from_tensor(cls, table: torch.Tensor | None, kind: str = "prv") -> PrivacyAccountant:
        if table is None:
            return cls(kind)
        if table.dtype != torch.float64:
            raise ValueError(f"accountant history must be stored in float64, got {table.dtype}")
        history = [Step(float(s), float(q), int(round(float(n)))) for s, q, n in table.reshape(-1, 3).tolist()]
        return cls(kind, history)


def opacus_epsilon(history: Sequence[Step], delta: float, kind: str = "prv") -> float:
    """ε of ``history`` by Opacus' accountant; remembered, since a round asks for the same history twice (the
    budget check before it, the report after it) and PRV takes about a second each time."""
    return _opacus_epsilon(tuple(history), float(delta), kind)


@functools.lru_cache(maxsize=4096)
def _opacus_epsilon(history: tuple[Step, ...], delta: float, kind: str) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.count) for s in history]
    # RDP's "optimal order is the largest alpha" and PRV's log(1 - q) at q = 1: the bounds stay valid
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(accountant.get_epsilon(delta=delta))


def pld_epsilon(history: Sequence[Step], delta: float) -> float:
    """ε of the same history with dp-accounting's PLD accountant (an independent implementation)."""
    from dp_accounting import dp_event, pld

    events = []
    for s in history:
        gaussian = dp_event.GaussianDpEvent(s.noise_multiplier)
        single = gaussian if s.sample_rate >= 1.0 else dp_event.PoissonSampledDpEvent(s.sample_rate, gaussian)
        events.append(dp_event.SelfComposedDpEvent(single, s.count))
    accountant = pld.PLDAccountant()
    accountant.compose(dp_event.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "prv") -> float:
    """The smallest σ (to Opacus' search tolerance) with ε(σ, q, steps) ≤ target, checked afterwards."""
    from opacus.accountants.utils import get_noise_multiplier

    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps < 1:
        raise ValueError("cannot calibrate noise for zero steps")
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
                epsilon_tolerance=0.01 * target_epsilon,
            )
        )
    reached = PrivacyAccountant(kind, [Step(sigma, sample_rate, steps)]).epsilon(delta)
    if reached > target_epsilon:  # the search promises this; never trust it blindly
        raise RuntimeError(f"calibrated σ={sigma} gives ε={reached} > target {target_epsilon}")
    return sigma


@dataclass(frozen=True)
class ClientDPPlan:
    """One client's DP-SGD schedule for the run, fixed before its first round."""

    noise_multiplier: float
    sample_rate: float  # q = b / n_k (Poisson)
    expected_batch_size: float  # q · n_k: the divisor of the noisy gradient sum
    steps_per_round: int
    planned_rounds: int  # rounds the calibration assumed this client joins
    participation: str
    target_epsilon: float
    delta: float
    accountant: str

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.noise_multiplier, self.sample_rate, self.steps_per_round, self.planned_rounds], dtype=torch.float64
        )


def ensure_within_budget(accountant: PrivacyAccountant, plan: ClientDPPlan) -> None:
    """Raise ``PrivacyBudgetExceeded`` if one more round of ``plan`` would take ``accountant`` past its ε."""
    sigma, q, steps = plan.noise_multiplier, plan.sample_rate, plan.steps_per_round
    after = accountant.epsilon_after(sigma, q, steps, plan.delta)
    if after > plan.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetExceeded(
            f"another round ({steps} steps at σ={sigma:.4g}, q={q:.4g}) would reach ε={after:.3f} > budget "
            f"{plan.target_epsilon:g} (δ={plan.delta:g}); spent so far ε={accountant.epsilon(plan.delta):.3f}"
        )


def planned_rounds(num_rounds: int, fraction_train: float, participation: str) -> int:
    """Rounds a client is assumed to join: all of them, or the expected number under client sampling."""
    if participation == "every-round":
        return num_rounds
    if participation == "expected":
        return max(1, math.ceil(num_rounds * fraction_train))
    raise ValueError(f"participation must be one of {PARTICIPATION}, got {participation!r}")


def plan_client(
    *,
    dataset_size: int,
    batch_size: int,
    local_steps: int,
    local_epochs: float,
    num_rounds: int,
    fraction_train: float,
    target_epsilon: float,
    delta: float,
    participation: str = "every-round",
    accountant: str = "prv",
    noise_multiplier: float = 0.0,
) -> ClientDPPlan:
    """σ for a client from its budget over the whole run (or a fixed σ when ``noise_multiplier`` > 0)."""
    if dataset_size < 1:
        raise ValueError("a DP client needs at least one training example")
    sample_rate = min(1.0, batch_size / dataset_size)
    steps = local_steps if local_steps > 0 else max(1, math.ceil(local_epochs / sample_rate))
    rounds = planned_rounds(num_rounds, fraction_train, participation)
    sigma = noise_multiplier or calibrate_noise(target_epsilon, delta, sample_rate, steps * rounds, accountant)
    return ClientDPPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        expected_batch_size=sample_rate * dataset_size,
        steps_per_round=steps,
        planned_rounds=rounds,
        participation=participation,
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
    )


def plan_for_run(config: RunConfig, dataset_size: int, noise_multiplier: float = 0.0) -> ClientDPPlan:
    """A client's plan under a run config (``noise_multiplier``: the σ fixed at its first round, if any)."""
    return plan_client(
        dataset_size=dataset_size,
        batch_size=config.train.batch_size,
        local_steps=config.train.local_steps,
        local_epochs=config.train.local_epochs,
        num_rounds=config.num_rounds,
        fraction_train=config.fraction_train,
        target_epsilon=config.dp.epsilon,
        delta=config.dp.delta,
        participation=config.dp.participation,
        accountant=config.dp.accountant,
        noise_multiplier=noise_multiplier or config.dp.noise_multiplier,
    )
