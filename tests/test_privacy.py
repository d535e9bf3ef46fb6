"""Sample-level DP-SGD on real MiniLM + TREC: per-sample gradients, accounting, hazards, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fixed_dp_plan

from fedlowrank.adapters import adapter_state, load_adapter_state, set_trainable
from fedlowrank.config import ConfigError, TrainSettings
from fedlowrank.privacy.accounting import (
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    Step,
    calibrate_noise,
    plan_client,
    pld_epsilon,
)
from fedlowrank.privacy.dp_sgd import PoissonBatches, per_example_loss_sum, private_gradients, train_private
from fedlowrank.privacy.fused import FusedPerSampleGrads, clip_and_noise_
from fedlowrank.runtime import get_workspace


@pytest.fixture()
def workspace(tiny_config):
    ws = get_workspace(tiny_config())
    load_adapter_state(ws.model, ws.initial_state)
    set_trainable(ws.model, lora_a=True, lora_b=True, head=True)
    return ws


@pytest.fixture()
def no_dropout(workspace):
    """BERT's own dropout draws different masks per call; the gradient-math comparisons switch it off."""
    dropouts = [m for m in workspace.model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0
    yield workspace
    for m, p in zip(dropouts, saved, strict=True):
        m.p = p


def _batch(ws, n=6):
    data = ws.client_train_dataset(0)
    return ws.collator([data[i] for i in range(n)])


def _perturb_b(ws, seed=0):
    """Non-zero B so that A's per-sample gradients are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    state = adapter_state(ws.model)
    for key in state:
        if "lora_B" in key:
            state[key] = 0.05 * torch.randn(state[key].shape, generator=gen)
    load_adapter_state(ws.model, state, strict=False)


def _brute_force(ws, batch, clip, expected_batch_size):
    """Per example: its own loss, its own gradient (row i of the same padded batch), clipped; summed, ÷ E[b]."""
    named = [(n, p) for n, p in ws.model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    ws.model.train()
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(per_example_loss_sum(ws.model, row), [p for _, p in named])
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for (n, _), g in zip(named, grads, strict=True):
            total[n] += factor * g.double()
    return {n: t / expected_batch_size for n, t in total.items()}


@pytest.mark.parametrize("engine", ["hooks", "fused"])
@pytest.mark.parametrize("clip", [1e-3, 100.0])  # every example clipped / none clipped
def test_noise_free_dp_gradient_equals_a_per_example_loop(no_dropout, engine, clip):
    workspace = no_dropout
    _perturb_b(workspace)
    batch = _batch(workspace)
    got = private_gradients(
        workspace.model, batch, engine=engine, max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=4.0
    )
    want = _brute_force(workspace, batch, clip, 4.0)
    assert set(got) == set(want) and any("lora_A" in n for n in got) and any("lora_B" in n for n in got)
    for name in want:  # float32 model vs float64 accumulation: relative error of the whole tensor
        rel = (got[name].double() - want[name]).norm() / want[name].norm()
        assert rel < 1e-5, (name, float(rel))


def test_fused_path_equals_opacus_hooks_and_standalone_clipping(no_dropout):
    workspace = no_dropout
    _perturb_b(workspace, seed=1)
    batch = _batch(workspace, n=8)
    kwargs = dict(max_grad_norm=0.05, noise_multiplier=0.0, expected_batch_size=8.0)
    hooks = private_gradients(workspace.model, batch, engine="hooks", **kwargs)
    fused = private_gradients(workspace.model, batch, engine="fused", **kwargs)
    for name in hooks:
        rel = (fused[name] - hooks[name]).norm() / hooks[name].norm().clamp(min=1e-30)
        assert rel < 1e-5, name
    # the standalone clip-and-noise (no Opacus optimizer) gives the same gradient
    named = [(n, p) for n, p in workspace.model.named_parameters() if p.requires_grad]
    with FusedPerSampleGrads(workspace.model) as engine:
        per_example_loss_sum(workspace.model, batch).backward()
        norms = clip_and_noise_(engine.parameters, 0.05, 0.0, 8.0)
        standalone = {n: p.grad.clone() for n, p in named}
    assert norms.shape == (8,) and bool((norms > 0.05).all())
    for name in hooks:
        torch.testing.assert_close(standalone[name], hooks[name], rtol=1e-5, atol=1e-10)
    assert all(not hasattr(p, "grad_sample") for _, p in named)  # the engine cleaned up
    assert type(workspace.model).forward is not None and "forward" not in vars(named[0][1])


def test_noise_has_the_calibrated_scale(no_dropout):
    workspace = no_dropout
    batch = _batch(workspace, n=4)
    sigma, clip, expected = 2.0, 0.5, 4.0
    grads = private_gradients(
        workspace.model, batch, engine="fused", max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=expected
    )
    clean = private_gradients(
        workspace.model, batch, engine="fused", max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=expected
    )
    noise = torch.cat([(grads[n] - clean[n]).flatten() for n in grads])
    assert noise.std().item() == pytest.approx(sigma * clip / expected, rel=0.02)


def test_accountant_matches_dp_accounting_pld_and_persists_in_float64():
    accountant = PrivacyAccountant("prv")
    for _ in range(3):  # three rounds of one client
        accountant.step(1.1, 0.03, 200)
    assert accountant.history == [Step(1.1, 0.03, 600)]
    eps = accountant.epsilon(1e-5)
    assert eps == pytest.approx(pld_epsilon(accountant.history, 1e-5), rel=0.03)
    assert eps >= pld_epsilon(accountant.history, 1e-5) * 0.999  # PRV's upper bound: never below PLD
    rdp = PrivacyAccountant("rdp", accountant.history).epsilon(1e-5)
    assert rdp >= eps  # RDP is the conservative one
    # changing (σ, q) mid-run composes heterogeneously, checked against PLD's composition
    accountant.step(0.9, 0.05, 100)
    assert accountant.epsilon(1e-5) == pytest.approx(pld_epsilon(accountant.history, 1e-5), rel=0.03)
    restored = PrivacyAccountant.from_tensor(accountant.to_tensor(), "prv")
    assert restored.history == accountant.history
    with pytest.raises(ValueError, match="float64"):
        PrivacyAccountant.from_tensor(accountant.to_tensor().float())


def test_calibrated_noise_meets_the_budget_over_the_whole_run():
    sigma = calibrate_noise(3.0, 1e-5, 0.032, 1000)
    eps = PrivacyAccountant("prv", [Step(sigma, 0.032, 1000)]).epsilon(1e-5)
    assert 0.97 * 3.0 <= eps <= 3.0
    every = plan_client(
        dataset_size=500,
        batch_size=16,
        local_steps=10,
        local_epochs=1,
        num_rounds=8,
        fraction_train=0.25,
        target_epsilon=2.0,
        delta=1e-5,
    )
    expected = plan_client(
        dataset_size=500,
        batch_size=16,
        local_steps=10,
        local_epochs=1,
        num_rounds=8,
        fraction_train=0.25,
        target_epsilon=2.0,
        delta=1e-5,
        participation="expected",
    )
    assert (every.planned_rounds, expected.planned_rounds) == (8, 2)
    assert every.noise_multiplier > expected.noise_multiplier  # planning for every round needs more noise
    assert every.sample_rate == pytest.approx(16 / 500)


def test_poisson_batches_have_the_right_rate_and_can_be_empty():
    batches = list(PoissonBatches(40, 0.05, 2000, torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert sizes.mean().item() == pytest.approx(2.0, rel=0.05)
    assert (sizes == 0).any()


def test_private_rounds_move_the_adapter_compose_epsilon_and_refuse_past_the_budget(workspace, tiny_config):
    """Two rounds on the same model (hooks added and removed twice), empty batches included, one accountant."""
    data = workspace.client_train_dataset(0)
    small = data.select(range(6))
    settings = TrainSettings(local_steps=12, batch_size=1, lr=0.05)
    plan = plan_client(
        dataset_size=len(small),
        batch_size=1,
        local_steps=12,
        local_epochs=1,
        num_rounds=2,
        fraction_train=1.0,
        target_epsilon=8.0,
        delta=1e-5,
    )
    accountant = PrivacyAccountant("prv")
    for engine in ("hooks", "hooks"):
        before = adapter_state(workspace.model)
        result = train_private(
            workspace.model,
            small,
            workspace.collator,
            settings,
            plan,
            accountant,
            max_grad_norm=1.0,
            engine=engine,
            optimizer_kind="sgd",
            seed=accountant.steps,
        )
        after = adapter_state(workspace.model)
        assert max(float((after[k] - before[k]).abs().max()) for k in after) > 0
        assert result.num_steps == 12
    assert accountant.steps == 24  # every step accounted, empty batches included
    assert accountant.epsilon(1e-5) <= 8.0
    first = PrivacyAccountant("prv", [Step(plan.noise_multiplier, plan.sample_rate, 12)]).epsilon(1e-5)
    assert accountant.epsilon(1e-5) > first * 1.2  # cumulative, not a fresh accountant per round
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        train_private(
            workspace.model,
            small,
            workspace.collator,
            settings,
            plan,
            accountant,
            max_grad_norm=1.0,
            engine="fused",
            seed=3,
        )
    assert accountant.steps == 24  # refused before anything ran


def test_empty_poisson_batches_take_a_noise_only_step(workspace):
    small = workspace.client_train_dataset(0).select(range(4))
    plan = fixed_dp_plan(4, 1.0, batch_size=1, local_steps=30)
    accountant = PrivacyAccountant("prv")
    result = train_private(
        workspace.model,
        small,
        workspace.collator,
        TrainSettings(lr=0.01),
        plan,
        accountant,
        max_grad_norm=1.0,
        engine="fused",
        optimizer_kind="sgd",
        seed=5,
    )
    assert result.empty_batches > 0 and accountant.steps == 30
    assert result.num_examples == sum(len(b) for b in PoissonBatches(4, 0.25, 30, torch.Generator().manual_seed(5)))


def test_a_round_that_cannot_move_the_weights_is_an_error(workspace):
    """The silent no-update hazard (opacus #820): a DP round whose adapters stay bit-identical fails loudly."""
    small = workspace.client_train_dataset(0).select(range(8))
    plan = fixed_dp_plan(8, 1.0, batch_size=4, local_steps=2)
    with pytest.raises(RuntimeError, match="bit-identical"):
        train_private(
            workspace.model,
            small,
            workspace.collator,
            TrainSettings(lr=0.0),
            plan,
            PrivacyAccountant(),
            max_grad_norm=1.0,
            engine="hooks",
            optimizer_kind="sgd",
        )


def _seeded_sgd_round(workspace, data, accountant, *, engine: str = "fused", **splitting) -> dict:
    """One seeded DP-SGD round (σ 0.5, 2 steps of 8) from the initial adapter; the adapter it ends at."""
    load_adapter_state(workspace.model, workspace.initial_state)
    train_private(
        workspace.model,
        data,
        workspace.collator,
        TrainSettings(lr=0.1),
        fixed_dp_plan(len(data), 0.5, batch_size=8, local_steps=2),
        accountant,
        max_grad_norm=1.0,
        engine=engine,
        optimizer_kind="sgd",
        seed=2,
        **splitting,
    )
    return adapter_state(workspace.model)


def test_physical_batch_splitting_gives_the_same_update(no_dropout):
    workspace = no_dropout
    small = workspace.client_train_dataset(0).select(range(16))
    states = [
        _seeded_sgd_round(workspace, small, PrivacyAccountant(), max_physical_batch_size=physical)
        for physical in (0, 3)
    ]
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)


def test_dp_config_is_validated(tiny_config):
    with pytest.raises(ConfigError, match="dp.engine"):
        tiny_config(**{"dp.epsilon": 3.0, "dp.engine": "magic"})
    with pytest.raises(ConfigError, match="participation"):
        tiny_config(**{"dp.epsilon": 3.0, "dp.participation": "sometimes"})
    with pytest.raises(ConfigError, match="uniform"):
        tiny_config(**{"dp.user-noise-multiplier": 1.0})
    assert not tiny_config(**{"dp.epsilon": math.inf}).dp.sample_level  # ∞: the non-private reference


def test_federated_dp_run_keeps_a_per_client_ledger_and_records_refusals(tiny_config):
    """The budget fits one round for the smaller client (larger q) and k ≥ 2 rounds for the larger one."""
    from simulations.run import run_inprocess

    probe = tiny_config(**{"num-clients": 2, "dp.epsilon": 100.0})
    ws = get_workspace(probe)
    sizes = [len(ws.client_train_dataset(pid)) for pid in range(2)]
    sigma, steps, batch = 1.0, 3, 16

    def eps(n, rounds):
        return PrivacyAccountant("prv", [Step(sigma, min(1.0, batch / n), steps * rounds)]).epsilon(1e-5)

    big, small = (0, 1) if sizes[0] > sizes[1] else (1, 0)
    budget = eps(sizes[small], 1) * 1.0001
    k = max(r for r in range(1, 10) if eps(sizes[big], r) <= budget)
    assert k >= 2, sizes
    config = tiny_config(
        **{
            "num-clients": 2,
            "num-rounds": k + 1,
            "dp.epsilon": budget,
            "dp.noise-multiplier": sigma,
            "dp.engine": "fused",
            "train.local-steps": steps,
            "name": "dp-ledger",
        }
    )
    summary = run_inprocess(config)
    rows = [json.loads(line) for line in (Path(config.output_dir) / "dp-ledger" / "metrics.jsonl").open()]
    ledger = [row["dp_epsilon_per_client"] for row in rows]
    for r in range(k):  # composed over rounds, never reset
        assert ledger[r][str(big)] == pytest.approx(eps(sizes[big], r + 1), rel=1e-9)
        assert ledger[r][str(small)] == pytest.approx(eps(sizes[small], 1), rel=1e-9)
    assert rows[1]["dp_refused_clients"] == [str(small)] and rows[1]["clients_refused"] == 1
    assert rows[1]["test_accuracy"] is not None  # the server carried on with the other client
    assert rows[k]["stopped"] == "privacy budget exhausted" and len(rows) == k + 1
    assert max(max(entry.values()) for entry in ledger) <= budget
    assert summary["dp_epsilon_max"] == pytest.approx(max(eps(sizes[big], k), eps(sizes[small], 1)), rel=1e-9)


# ---- user-level DP ---------------------------------------------------------------------------------
def test_noisy_mean_clips_jointly_and_has_the_dp_fedavg_noise_scale():
    from fedlowrank.privacy.user_level import clip_update, noisy_mean

    gen = torch.Generator().manual_seed(0)
    updates = [{"a": torch.randn(30, 20, generator=gen) * s, "b": torch.randn(50, generator=gen)} for s in (0.01, 5)]
    clipped, norm = clip_update(updates[1], 2.0)
    joint = math.sqrt(sum(float(t.double().pow(2).sum()) for t in clipped.values()))
    assert norm > 2.0 and joint == pytest.approx(2.0, rel=1e-6)
    small, _ = clip_update(updates[0], 1e3)
    assert all(torch.equal(small[k], updates[0][k]) for k in small)  # under the bound: untouched
    clean, norms = noisy_mean(updates, 2.0, 0.0)
    expected = {k: (clip_update(updates[0], 2.0)[0][k].double() + clipped[k].double()) / 2 for k in clean}
    for key in clean:
        torch.testing.assert_close(clean[key], expected[key])
    noisy, _ = noisy_mean(updates * 50, 2.0, 3.0, torch.Generator().manual_seed(1))
    clean100, _ = noisy_mean(updates * 50, 2.0, 0.0)
    noise = torch.cat([(noisy[k] - clean100[k]).flatten() for k in noisy])
    assert noise.std().item() == pytest.approx(3.0 * 2.0 / 100, rel=0.05)


def test_user_level_epsilon_is_the_composed_gaussian_mechanism():
    from fedlowrank.privacy.user_level import UserLevelLedger

    ledger = UserLevelLedger(noise_multiplier=1.0, sample_rate=1.0, delta=1e-5)
    eps = [ledger.release() for _ in range(4)]
    assert eps == sorted(eps) and eps[0] > 0
    # R Gaussian mechanisms of multiplier z compose exactly to one of multiplier z/√R
    assert eps[3] == pytest.approx(PrivacyAccountant("prv", [Step(0.5, 1.0, 1)]).epsilon(1e-5), rel=0.02)
    assert eps[3] == pytest.approx(pld_epsilon([Step(1.0, 1.0, 4)], 1e-5), rel=0.03)


def test_fedsvd_user_dp_equals_fedsvd_math_on_the_noisy_mean_of_clipped_b():
    from fedlowrank.adapters import LayerFactors
    from fedlowrank.privacy.user_level import UserLevelLedger
    from strategies.method import RoundInput
    from strategies.methods import fedsvd
    from strategies.user_dp import ClientUpdates, UserLevelDP

    gen = torch.Generator().manual_seed(3)
    layer, d_out, d_in, r = "layer.q", 12, 10, 3
    prev = {
        layer: LayerFactors(
            A=torch.linalg.qr(torch.randn(d_in, r, generator=gen))[0].T.contiguous(),
            B=torch.randn(d_out, r, generator=gen),
        )
    }
    key = f"{layer}.lora_B.weight"
    server_state = {key: prev[layer].B.clone()}
    states = [{key: prev[layer].B + s * torch.randn(d_out, r, generator=gen)} for s in (0.1, 3.0, 0.5)]
    clients = [{layer: LayerFactors(A=prev[layer].A, B=s[key])} for s in states]
    weights = torch.full((3,), 1 / 3, dtype=torch.float64)
    mechanism = UserLevelDP(0.0, 1.0, UserLevelLedger(1.0, 1.0, 1e-5))
    private = mechanism.privatize(ClientUpdates(states, clients, weights), server_state, prev)
    assert private.target_products is None and private.metrics["user_dp_epsilon"] > 0
    mean = (
        sum(
            prev[layer].B + (s[key] - prev[layer].B) * min(1.0, 1.0 / float((s[key] - prev[layer].B).norm()))
            for s in states
        )
        / 3
    )
    torch.testing.assert_close(private.uploads[0][key], mean, rtol=1e-6, atol=1e-6)
    update = fedsvd.server_update(RoundInput(private.factors, private.weights, prev, 1))
    new = update.factors[layer]
    torch.testing.assert_close((new.B @ new.A).double(), (mean @ prev[layer].A).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["fedit", "fedsvd", "lora-fair"])
def test_user_level_dp_runs_end_to_end_and_accounts_every_round(tiny_config, strategy):
    from simulations.run import run_inprocess

    config = tiny_config(
        **{
            "strategy": strategy,
            "weighting": "uniform",
            "dp.user-noise-multiplier": 1.0,
            "dp.user-clip-norm": 0.5,
            "name": f"udp-{strategy}",
        }
    )
    run_inprocess(config)
    rows = [json.loads(line) for line in (Path(config.output_dir) / config.name / "metrics.jsonl").open()]
    eps = [row["user_dp_epsilon"] for row in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert eps[1] == pytest.approx(pld_epsilon([Step(1.0, 1.0, 2)], 1e-5), rel=0.03)
    assert rows[-1]["test_accuracy"] is not None


def test_user_level_dp_refuses_strategies_without_a_mechanism(tiny_config):
    from strategies.registry import resolve_method

    config = tiny_config(**{"strategy": "fedex", "weighting": "uniform", "dp.user-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="user-level DP is available for"):
        resolve_method(config)


@pytest.mark.parametrize("engine", ["hooks", "fused"])
def test_dp_trains_only_what_the_strategy_trains(workspace, engine):
    """FFA-LoRA / FedSVD: B (and the head) get private updates, A stays bit-identical and gets no noise."""
    set_trainable(workspace.model, lora_a=False, lora_b=True, head=True)
    small = workspace.client_train_dataset(0).select(range(12))
    plan = fixed_dp_plan(12, 1.0, batch_size=4, local_steps=3)
    before = adapter_state(workspace.model)
    train_private(
        workspace.model,
        small,
        workspace.collator,
        TrainSettings(lr=0.05),
        plan,
        PrivacyAccountant(),
        max_grad_norm=1.0,
        engine=engine,
        optimizer_kind="sgd",
        seed=4,
    )
    after = adapter_state(workspace.model)
    for key in after:
        changed = not torch.equal(after[key], before[key])
        assert changed == ("lora_A" not in key), key
    set_trainable(workspace.model, lora_a=True, lora_b=True, head=True)


@pytest.mark.parametrize("engine", ["fused", "hooks"])
def test_length_sorted_pieces_give_the_same_dp_update(no_dropout, engine, monkeypatch):
    """Running each Poisson batch in length-sorted pieces (``max_tokens``) clips and noises the same per-example
    gradients once per logical batch: the update equals one pass."""
    workspace = no_dropout
    small = workspace.client_train_dataset(0).select(range(16))
    lengths = [len(row["input_ids"]) for row in small]
    assert len(set(lengths)) > 1  # otherwise sorting by length would not change the padding
    import fedlowrank.privacy.dp_sgd as dp_sgd
    from fedlowrank.training import split_by_length

    pieces = []

    def counted(batch, max_tokens):
        parts = list(split_by_length(batch, max_tokens))
        pieces.append(len(parts))
        return parts

    monkeypatch.setattr(dp_sgd, "split_by_length", counted)
    states, accounted = [], []
    for max_tokens in (0, 2 * max(lengths)):  # about two examples per piece
        accountant = PrivacyAccountant()
        states.append(_seeded_sgd_round(workspace, small, accountant, engine=engine, max_tokens=max_tokens))
        accounted.append(accountant.steps)
    assert accounted == [2, 2]  # one accounted step per logical batch, not per piece
    assert pieces and max(pieces) > 1  # the second run really split its batches
    moved = max(float((states[0][k] - workspace.initial_state[k]).abs().max()) for k in states[0])
    assert moved > 0
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-6)
