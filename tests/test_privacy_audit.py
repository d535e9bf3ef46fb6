"""The one-run privacy audit (Steinke, Nasr and Jagielski 2023): its statistics against exact binomial sums, its
soundness on a mechanism of known ε, and both directions on DP-SGD: a correct mechanism's lower bound stays under
the accounted ε, and one whose noise is switched off is caught."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlowrank.privacy.accounting import plan_client
from fedlowrank.privacy.audit import audit_dp_sgd, audit_p_value, best_guesses, epsilon_lower_bound


def _tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) ≥ v], summed exactly."""
    q = Fraction(p)
    return float(sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1)))


@pytest.mark.parametrize(("r", "v", "eps"), [(10, 7, 0.0), (50, 40, 1.0), (200, 150, 0.5), (30, 30, 2.0)])
def test_p_value_without_delta_is_the_binomial_tail(r, v, eps):
    p = 1 / (1 + math.exp(-eps))
    assert audit_p_value(r, r, v, eps, 0.0) == pytest.approx(_tail(r, v, p), rel=1e-9)


def test_p_value_delta_term_follows_the_theorem():
    m, r, v, eps, delta = 100, 40, 30, 0.7, 1e-3
    p = 1 / (1 + math.exp(-eps))
    pmf = [_tail(r, j, p) - _tail(r, j + 1, p) for j in range(r + 1)]
    slope = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
    want = _tail(r, v, p) + 2 * m * delta * slope
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-9)


def test_lower_bound_is_where_the_p_value_meets_beta():
    # every guess right, no δ: P[Bin(r, p) ≥ r] = p^r = β, so ε = logit(β^(1/r))
    r, beta = 100, 0.05
    p = beta ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert epsilon_lower_bound(100, 100, 50, 1e-5, 0.05) == 0.0  # coin-flip guessing proves nothing
    with pytest.raises(ValueError, match="correct"):
        audit_p_value(10, 5, 6, 1.0, 0.0)


def test_audit_is_sound_on_randomized_response_of_known_epsilon():
    """Canaries seen through ε₀-randomized response: the bound never exceeds ε₀ and is not vacuous."""
    eps0, m = 2.0, 2000
    bounds = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps0) / (1 + math.exp(eps0))
        scores = np.where(truthful, included, ~included).astype(float) + 1e-3 * rng.random(m)
        bounds.append(best_guesses(scores, included, 0.0, 0.05)[0])
    assert max(bounds) <= eps0
    assert min(bounds) > 0.5 * eps0


def _plan(epsilon: float):
    return plan_client(
        dataset_size=2000, batch_size=200, local_steps=10, local_epochs=1, num_rounds=3, fraction_train=1.0,
        target_epsilon=epsilon, delta=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("mechanism", ["opacus", "engine"])
def test_correct_dp_sgd_stays_under_its_epsilon_and_no_noise_is_caught(mechanism):
    for epsilon in (1.0, 4.0):
        honest = audit_dp_sgd(_plan(epsilon), 2000, max_grad_norm=1.0, canaries=1000, mechanism=mechanism)
        assert honest.epsilon_accounted <= epsilon * (1 + 1e-9)
        assert honest.epsilon_lower_bound <= honest.epsilon_accounted
    broken = audit_dp_sgd(_plan(1.0), 2000, max_grad_norm=1.0, canaries=1000, mechanism=mechanism, disable_noise=True)
    assert broken.epsilon_accounted == pytest.approx(1.0, abs=0.02)  # the claim does not know the noise is gone
    assert broken.epsilon_lower_bound > 3 * broken.epsilon_accounted


def test_cli_audits_every_client_and_flags_a_broken_mechanism(tmp_path, data_dir):
    from fedlowrank.cli import app

    common = ["audit", "privacy", "--data-dir", str(data_dir), "--canaries", "400"]
    sets = ["--set", "dp.epsilon=2", "--set", "num-clients=3", "--set", "data.max-train-examples=600"]
    done = CliRunner().invoke(app, [*common, *sets, "--output", str(tmp_path / "ok")])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "ok" / "audit.json").read_text())
    assert sorted(saved["clients"]) == ["0", "1", "2"]
    assert saved["command"].startswith("fedlowrank audit privacy ")  # the options as given, to rerun it
    assert "--canaries 400" in saved["command"] and "--set dp.epsilon=2 --set num-clients=3" in saved["command"]
    for result in saved["clients"].values():
        assert 0 <= result["epsilon_lower_bound"] <= result["epsilon_accounted"] <= 2.0 * (1 + 1e-9)
    assert "ε lower bound" in (tmp_path / "ok" / "audit.md").read_text()

    broken = CliRunner().invoke(
        app, [*common, *sets, "--client", "1", "--test-without-noise", "--output", str(tmp_path / "b")]
    )
    assert broken.exit_code == 1 and "LEAKS MORE THAN CLAIMED" in broken.output

    refused = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "c")])
    assert refused.exit_code == 2 and "no sample-level DP" in refused.output
