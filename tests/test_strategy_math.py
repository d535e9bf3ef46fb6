"""Each method's server math against float64 reference math and its defining invariant."""

import pytest
import torch

from fedlowrank.adapters import LayerFactors
from fedlowrank.lowrank import ideal_product, product, refactorize_product, stacked_factors, truncated_svd_of_sum
from fedlowrank.metrics import layer_bias, personalization_gap
from strategies.method import RoundInput, client_weights
from strategies.methods import fedex, fedit, fedsa, fedsvd, ffa, flexlora, flora, lora_fair

D_OUT, D_IN, R = 24, 20, 4


def _layer(generator, scale=1.0):
    return LayerFactors(
        A=scale * torch.randn(R, D_IN, generator=generator), B=scale * torch.randn(D_OUT, R, generator=generator)
    )


def _round(k=5, seed=0, drift=0.3, server_round=1, shared_a=False):
    """Clients drifted from a common previous adapter (the realistic case), float32 like the wire."""
    generator = torch.Generator().manual_seed(seed)
    previous = {"l0": _layer(generator), "l1": _layer(generator)}
    clients = []
    for _ in range(k):
        client = {}
        for name, prev in previous.items():
            a = prev.A if shared_a else prev.A + drift * torch.randn(R, D_IN, generator=generator)
            client[name] = LayerFactors(A=a, B=prev.B + drift * torch.randn(D_OUT, R, generator=generator))
        clients.append(client)
    weights = client_weights(torch.randint(5, 50, (k,), generator=generator).tolist())
    return RoundInput(clients=clients, weights=weights, previous=previous, server_round=server_round)


def _bias(inputs, update, layer="l0"):
    broadcast = product(update.factors[layer])
    if layer in update.fold:  # ΔW in weight units; the bias compares products
        broadcast = broadcast + update.fold[layer] / inputs.scale
    clients = [c[layer] for c in inputs.clients]
    return layer_bias(clients, inputs.weights, broadcast, product(inputs.previous[layer])).bias_rel


def test_refactorization_keeps_the_product_and_gives_orthonormal_a():
    generator = torch.Generator().manual_seed(1)
    b, a = (
        torch.randn(300, 8, generator=generator, dtype=torch.float64),
        torch.randn(8, 200, generator=generator, dtype=torch.float64),
    )
    b_new, a_new = refactorize_product(b, a)
    torch.testing.assert_close(b_new @ a_new, b @ a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    dense_singular = torch.linalg.svdvals(b @ a)[:8]
    torch.testing.assert_close(b_new.norm(dim=0), dense_singular, rtol=1e-9, atol=1e-9)  # B = U S


def test_fedsvd_keeps_the_averaged_product_and_orthonormalizes_a():
    inputs = _round(shared_a=True)  # FedSVD clients train B only: A is the broadcast one
    update = fedsvd.server_update(inputs, fedsvd.FedSVDOptions(period=1))
    for layer in ("l0", "l1"):
        new = update.factors[layer]
        target = ideal_product([c[layer] for c in inputs.clients], inputs.weights)
        relative = (product(new) - target).norm() / target.norm()
        assert relative < 1e-5
        torch.testing.assert_close(
            new.A.double() @ new.A.double().T, torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0
        )
    assert _bias(inputs, update) < 1e-6


def test_fedsvd_period_skips_refactorization_between_periods():
    inputs = _round(shared_a=True, server_round=3)
    update = fedsvd.server_update(inputs, fedsvd.FedSVDOptions(period=2))
    assert torch.equal(update.factors["l0"].A, inputs.previous["l0"].A)
    refactored = fedsvd.server_update(_round(shared_a=True, server_round=4), fedsvd.FedSVDOptions(period=2))
    assert not torch.equal(refactored.factors["l0"].A, inputs.previous["l0"].A)


def test_ffa_averages_b_and_has_exactly_zero_bias():
    inputs = _round(shared_a=True)
    update = ffa.server_update(inputs)
    assert torch.equal(update.factors["l0"].A, inputs.previous["l0"].A)
    assert _bias(inputs, update) < 1e-6


def test_fedex_effective_weight_equals_the_average_of_client_weights():
    inputs = _round()
    scale, folded_before = 2.0, torch.randn(D_OUT, D_IN, dtype=torch.float64)
    inputs.scale = scale
    w0 = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    update = fedex.server_update(inputs)
    new = update.factors["l0"]
    effective = w0 + scale * (folded_before + product(new)) + update.fold["l0"]  # the fold is ΔW itself
    clients_effective = sum(
        float(p) * (w0 + scale * (folded_before + product(c["l0"])))
        for p, c in zip(inputs.weights, inputs.clients, strict=True)
    )
    torch.testing.assert_close(effective, clients_effective, rtol=1e-10, atol=1e-10)
    assert _bias(inputs, update) < 1e-12


def test_the_stack_of_mixed_rank_factors_is_the_weighted_sum_of_their_products_in_float64():
    """Each client's rows of A are scaled by its own weight, whatever its rank: Σ_k w_k B_k A_k summed one
    client at a time in float64; a weight per factor pair, or an error."""
    generator = torch.Generator().manual_seed(4)
    ranks = [1, 4, 2, 3]
    pairs = [(torch.randn(D_OUT, r, generator=generator), torch.randn(r, D_IN, generator=generator)) for r in ranks]
    weights = torch.tensor([0.1, 0.4, 0.2, 0.3])
    expected = sum(float(w) * (b.double() @ a.double()) for w, (b, a) in zip(weights, pairs, strict=True))
    b_stack, a_stack = stacked_factors(pairs, weights)
    assert b_stack.dtype == a_stack.dtype == torch.float64 and a_stack.shape == (sum(ranks), D_IN)
    torch.testing.assert_close(b_stack @ a_stack, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="4 factor pairs but 3 weights"):
        stacked_factors(pairs, weights[:3])


def test_flora_stack_equals_the_weighted_sum_of_products_and_restarts_the_adapter():
    inputs = _round(k=4)
    clients = [c["l1"] for c in inputs.clients]
    b_stack, a_stack = stacked_factors([(c.B, c.A) for c in clients], inputs.weights)
    assert b_stack.shape == (D_OUT, 4 * R) and a_stack.shape == (4 * R, D_IN)
    torch.testing.assert_close(b_stack @ a_stack, ideal_product(clients, inputs.weights), rtol=1e-10, atol=1e-10)
    inputs.seed = 3
    update = flora.server_update(inputs)
    assert torch.count_nonzero(update.factors["l1"].B) == 0
    assert update.factors["l1"].A.abs().max() <= 1 / D_IN**0.5
    assert _bias(inputs, update, "l1") < 1e-12
    again = flora.server_update(inputs)
    assert torch.equal(again.factors["l1"].A, update.factors["l1"].A)  # fresh A reproducible from seed + round


def test_flexlora_is_the_truncated_svd_of_the_average_product():
    inputs = _round()
    update = flexlora.server_update(inputs)
    target = ideal_product([c["l0"] for c in inputs.clients], inputs.weights)
    u, s, vh = torch.linalg.svd(target)
    best = (u[:, :R] * s[:R]) @ vh[:R]
    torch.testing.assert_close(product(update.factors["l0"]), best, rtol=1e-4, atol=1e-4)
    expected_bias = float(s[R:].norm() / s.norm())
    assert _bias(inputs, update) == pytest.approx(expected_bias, rel=1e-4)


def test_truncated_svd_of_sum_without_the_dense_matrix():
    inputs = _round(k=3)
    pairs = [(c["l0"].B.double(), c["l0"].A.double()) for c in inputs.clients]
    b, a = truncated_svd_of_sum(pairs, inputs.weights, rank=3 * R)  # full rank of the stack: exact
    torch.testing.assert_close(
        b @ a, ideal_product([c["l0"] for c in inputs.clients], inputs.weights), rtol=1e-9, atol=1e-9
    )


def test_fedsa_averages_only_a():
    inputs = _round()
    update = fedsa.server_update(inputs)
    expected = sum(float(p) * c["l0"].A.double() for p, c in zip(inputs.weights, inputs.clients, strict=True))
    torch.testing.assert_close(update.factors["l0"].A.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(update.factors["l0"].B, inputs.previous["l0"].B)


def _ridge_objective(b, target, a_bar, b_bar, lam):
    return float(((target - b @ a_bar) ** 2).sum() + lam * ((b - b_bar) ** 2).sum())


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_lora_fair_closed_form_is_optimal_for_its_objective(lam):
    inputs = _round(seed=4)
    clients = [c["l0"] for c in inputs.clients]
    averaged = fedit.average_factors(inputs.clients, inputs.weights)["l0"]
    a_bar, b_bar = averaged.A.double(), averaged.B.double()
    target = ideal_product(clients, inputs.weights)
    solution = lora_fair.ridge_correction(clients, inputs.weights, averaged.A, averaged.B, lam)
    # the gradient of the ridge objective vanishes ...
    gradient = -2 * (target - solution @ a_bar) @ a_bar.T + 2 * lam * (solution - b_bar)
    assert gradient.norm() < 1e-8 * max(1.0, float(target.norm()))
    # ... and no perturbation does better
    best = _ridge_objective(solution, target, a_bar, b_bar, lam)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        nudged = solution + 1e-3 * torch.randn(solution.shape, generator=generator, dtype=torch.float64)
        assert _ridge_objective(nudged, target, a_bar, b_bar, lam) >= best


def test_lora_fair_never_increases_the_bias_over_fedit_on_random_drift():
    for seed in range(20):
        inputs = _round(seed=seed, drift=0.05 + 0.05 * (seed % 5))
        fedit_bias = _bias(inputs, fedit.server_update(inputs))
        fair_bias = _bias(
            inputs, lora_fair.server_update(inputs, lora_fair.LoRAFAIROptions(solver="closed-form", lam=0.01))
        )
        assert 0 <= fair_bias <= fedit_bias + 1e-12
        # the B-only fix cannot remove the part of M* outside the row space of Ā
        a_bar = fedit.average_factors(inputs.clients, inputs.weights)["l0"].A.double()
        target = ideal_product([c["l0"] for c in inputs.clients], inputs.weights)
        projector = a_bar.T @ torch.linalg.solve(a_bar @ a_bar.T, a_bar)
        floor = float((target @ (torch.eye(D_IN, dtype=torch.float64) - projector)).norm() / target.norm())
        assert fair_bias >= floor - 1e-9


def test_lora_fair_iterative_solver_lowers_the_cosine_objective():
    inputs = _round(seed=7, drift=0.3)
    clients = [c["l0"] for c in inputs.clients]
    averaged = fedit.average_factors(inputs.clients, inputs.weights)["l0"]
    target_at, gram, norm = lora_fair._low_rank_terms(clients, inputs.weights, averaged.A)
    b_bar = averaged.B.double()
    solved = lora_fair.iterative_correction(clients, inputs.weights, averaged.A, averaged.B, lam=0.01, iterations=300)
    before = float(lora_fair.cosine_objective(b_bar, b_bar, target_at, gram, norm, 0.01))
    after = float(lora_fair.cosine_objective(solved, b_bar, target_at, gram, norm, 0.01))
    assert after < before
    # the low-rank cosine equals the dense one
    dense_target = ideal_product(clients, inputs.weights)
    dense = 1 - torch.nn.functional.cosine_similarity(
        (b_bar @ averaged.A.double()).flatten(), dense_target.flatten(), dim=0
    )
    assert before == pytest.approx(float(dense), rel=1e-9, abs=1e-12)


def test_personalization_gap():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(D_OUT, R, generator=generator)
    a = torch.randn(R, D_IN, generator=generator)
    assert personalization_gap(b, a, a) == 0.0
    assert personalization_gap(torch.zeros_like(b), a, 2 * a) == 0.0
    assert personalization_gap(b, 2 * a, a) == pytest.approx(1.0)
