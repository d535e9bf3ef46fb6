"""GaLoreAdamW against torch AdamW and a float64 reference; moment policies; state; federated GaLore math."""

from __future__ import annotations

import copy
import csv
import io
import re
from collections import Counter

import pytest
import torch
from torch import nn

from fedlowrank.fed_galore import (
    aggregate_projected,
    client_projected_updates,
    projected_average,
    projected_upload_bytes,
    projectors_from_wire,
    projectors_to_wire,
    round_projectors,
)
from fedlowrank.galore import (
    GaLoreAdamW,
    galore_param_groups,
    optimizer_state_breakdown,
    optimizer_state_bytes,
)

BETAS = (0.9, 0.999)
EPS = 1e-8


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).to(dtype)


def _batches(count: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(24, 16, generator=generator, dtype=dtype), torch.randint(0, 8, (24,), generator=generator))
        for _ in range(count)
    ]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    inputs, labels = batch
    loss = nn.functional.cross_entropy(model(inputs), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_identity_projector_equals_torch_adamw_step_for_step():
    reference, model = _mlp(), _mlp()
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    ref_weights = [p for p in reference.parameters() if p.dim() == 2]
    ref_biases = [p for p in reference.parameters() if p.dim() == 1]
    optimizer = GaLoreAdamW(
        [
            {"params": weights, "galore": True, "projector": "identity", "rank": 1, "scale": 1.0},
            {"params": biases, "lr": 3e-3, "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    torch_adamw = torch.optim.AdamW(
        [{"params": ref_weights}, {"params": ref_biases, "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1
    )
    for batch in _batches(25):
        _train_step(reference, torch_adamw, batch)
        _train_step(model, optimizer, batch)
        assert _max_diff(model, reference) <= 1e-6


def test_full_rank_svd_equals_adamw_when_the_basis_is_coordinate_aligned():
    # Adam is equivariant to signed permutations only. A first gradient with orthogonal rows of distinct norms
    # has left singular vectors ±e_i, so full-rank SVD GaLore (basis kept: long gap) must then track AdamW.
    torch.manual_seed(0)
    w0 = torch.randn(6, 10)
    first = torch.zeros(6, 10)
    first[:, :6] = torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))
    grads = [first] + [torch.randn(6, 10) for _ in range(15)]
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    galore = GaLoreAdamW(
        [{"params": [ours], "galore": True, "rank": 6, "projector": "svd", "scale": 1.0, "update_gap": 1000}],
        lr=1e-2,
        weight_decay=0.05,
    )
    adamw = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.05)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        galore.step()
        adamw.step()
        assert float((ours - theirs).detach().abs().max()) <= 1e-6


def _reference_galore(w0, grads, lr, weight_decay, rank, gap, scale):
    """GaLore written out in float64: left-side SVD basis refreshed every ``gap`` steps, moments kept."""
    w = w0.clone()
    m = v = basis = None
    for t, grad in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            basis = torch.linalg.svd(grad, full_matrices=False)[0][:, :rank]
        low = basis.T @ grad
        m = torch.zeros_like(low) if m is None else m
        v = torch.zeros_like(low) if v is None else v
        m = BETAS[0] * m + (1 - BETAS[0]) * low
        v = BETAS[1] * v + (1 - BETAS[1]) * low**2
        m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
        w = w * (1 - lr * weight_decay) - lr * scale * basis @ (m_hat / (v_hat.sqrt() + EPS))
    return w


@pytest.mark.parametrize("rank", [3, 8])
def test_galore_matches_the_float64_reference(rank):
    generator = torch.Generator().manual_seed(2)
    w0 = torch.randn(8, 12, generator=generator, dtype=torch.float64)
    grads = [torch.randn(8, 12, generator=generator, dtype=torch.float64) for _ in range(11)]
    param = nn.Parameter(w0.clone())
    optimizer = GaLoreAdamW(
        [{"params": [param], "galore": True, "rank": rank, "update_gap": 4, "scale": 0.5, "projector": "svd"}],
        lr=1e-2,
        weight_decay=0.1,
    )
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    expected = _reference_galore(w0, grads, 1e-2, 0.1, rank, 4, 0.5)
    assert torch.allclose(param.detach(), expected, atol=1e-12)
    if rank == 8:
        # Full rank yet not AdamW: Adam's coordinate-wise normalisation is not rotation invariant.
        adamw_param = nn.Parameter(w0.clone())
        adamw = torch.optim.AdamW([adamw_param], lr=1e-2, weight_decay=0.1)
        for grad in grads:
            adamw_param.grad = grad.clone()
            adamw.step()
        assert float((adamw_param - param).detach().abs().max()) > 1e-4


def _policy_run(policy: str):
    generator = torch.Generator().manual_seed(5)
    param = nn.Parameter(torch.randn(8, 12, generator=generator, dtype=torch.float64))
    optimizer = GaLoreAdamW(
        [{"params": [param], "galore": True, "rank": 3, "update_gap": 3, "projector": "svd", "moment_policy": policy}],
        lr=1e-2,
    )
    grads = [torch.randn(8, 12, generator=generator, dtype=torch.float64) for _ in range(4)]
    state = optimizer.state[param]
    for grad in grads[:3]:
        param.grad = grad
        optimizer.step()
    old_m, old_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    param.grad = grads[3]
    optimizer.step()  # step 3 refreshes the basis
    projector = state["projector"]
    return state, projector, old_m, old_v, projector.down(grads[3])


def test_moment_policies_behave_as_declared_in_the_optimizer():
    b1, b2 = BETAS
    state, projector, old_m, old_v, low = _policy_run("keep")
    assert projector.last_refresh == 3 and state["moment_step"] == 4
    assert torch.allclose(state["exp_avg"], b1 * old_m + (1 - b1) * low)
    state, projector, old_m, old_v, low = _policy_run("reset")
    assert state["moment_step"] == 1 and state["step"] == 4
    assert torch.allclose(state["exp_avg"], (1 - b1) * low)
    assert torch.allclose(state["exp_avg_sq"], (1 - b2) * low**2)
    state, projector, old_m, old_v, low = _policy_run("rotate")
    t = projector.transition()
    assert state["moment_step"] == 4
    assert torch.allclose(state["exp_avg"], b1 * (t @ old_m) + (1 - b1) * low)
    assert torch.allclose(state["exp_avg_sq"], b2 * (t**2 @ old_v) + (1 - b2) * low**2)


@pytest.mark.parametrize("kind", ["svd", "randomized-svd", "gaussian", "dct"])
def test_state_dict_round_trips_with_projectors(kind):
    model = _mlp(3)
    groups = galore_param_groups(model, rank=4, update_gap=3, projector=kind, moment_policy="rotate", seed=7)
    optimizer = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)
    batches = _batches(12, seed=4)
    for batch in batches[:5]:
        _train_step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain values only: no pickled objects
    twin = copy.deepcopy(model)
    twin_optimizer = GaLoreAdamW(galore_param_groups(twin, rank=4, update_gap=3, projector=kind), lr=1e-2)
    twin_optimizer.load_state_dict(saved)
    assert twin_optimizer.param_groups[0]["moment_policy"] == "rotate"  # groups come from the saved state
    for (index, ours), theirs in zip(optimizer.projectors().items(), twin_optimizer.projectors().values(), strict=True):
        assert torch.equal(ours.basis, theirs.basis), index
        assert ours.last_refresh == theirs.last_refresh
    for batch in batches[5:]:  # crosses the refresh at step 6 on both
        _train_step(model, optimizer, batch)
        _train_step(twin, twin_optimizer, batch)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_is_smaller_than_adamw_by_the_rank_ratio():
    weight = nn.Parameter(torch.randn(32, 64))
    galore = GaLoreAdamW([{"params": [weight], "galore": True, "rank": 4}], lr=1e-3)
    weight.grad = torch.randn(32, 64)
    galore.step()
    breakdown = optimizer_state_breakdown(galore)
    # Moments 2·r·n floats, basis m·r floats; AdamW holds 2·m·n.
    assert breakdown["moments"] == 2 * 4 * 64 * 4 and breakdown["projector_bases"] == 32 * 4 * 4
    adamw = torch.optim.AdamW([weight], lr=1e-3)
    adamw.step()
    adamw_bytes = optimizer_state_bytes(adamw)
    assert adamw_bytes == 2 * 32 * 64 * 4
    assert optimizer_state_bytes(galore) / adamw_bytes <= 2 * 4 / 32


def test_galore_param_groups_picks_the_requested_weights():
    model = nn.Module()
    model.embeddings = nn.Embedding(50, 24)
    model.layer = nn.ModuleDict({"query": nn.Linear(24, 24), "value": nn.Linear(24, 24), "ffn": nn.Linear(24, 48)})
    model.adapter = nn.ModuleDict({"lora_A": nn.Linear(24, 12, bias=False)})
    model.classifier = nn.Linear(24, 10)
    model.norm = nn.LayerNorm(24)
    model.frozen = nn.Linear(24, 24)
    model.frozen.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}

    def picked(groups):
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
        return sorted(names[id(p)] for p in groups[0]["params"])

    layers = ["layer.ffn.weight", "layer.query.weight", "layer.value.weight"]
    assert picked(galore_param_groups(model, rank=4)) == layers
    assert picked(galore_param_groups(model, ["query"], rank=4)) == ["layer.query.weight"]
    assert picked(galore_param_groups(model, ["re:layer\\.(query|value)"], rank=4)) == layers[1:]
    with_extras = galore_param_groups(model, rank=4, include_head=True, include_adapters=True, lr=0.1)
    assert picked(with_extras) == sorted([*layers, "classifier.weight", "adapter.lora_A.weight"])
    assert all(group["lr"] == 0.1 for group in with_extras)
    # Weights whose smaller side is <= rank gain nothing from projection and stay plain.
    assert picked(galore_param_groups(model, rank=12, include_head=True)) == layers
    with pytest.raises(ValueError, match="no trainable 2-D weight"):
        galore_param_groups(model, ["missing"], rank=4)


def test_bad_configuration_raises_clear_errors():
    weight = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="unknown projector"):
        GaLoreAdamW([{"params": [weight], "galore": True, "projector": "pca"}])
    with pytest.raises(ValueError, match="rank"):
        GaLoreAdamW([{"params": [weight], "galore": True, "rank": 0}])
    with pytest.raises(ValueError, match="moment_policy"):
        GaLoreAdamW([{"params": [weight], "galore": True, "moment_policy": "swap"}])
    with pytest.raises(ValueError, match="option"):
        GaLoreAdamW([{"params": [weight], "galore": True, "projector": "dct", "projector_options": {"niter": 1}}])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):
            GaLoreAdamW([weight], moment_bits=8)
    with pytest.raises(ValueError, match="moment_bits"):
        GaLoreAdamW([weight], moment_bits=4)


def _trec_bag_of_words(data_dir, vocab_size: int = 600, limit: int = 1500):
    with open(data_dir / "trec" / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:limit]
    tokenized = [re.findall(r"[a-z']+", row["text"].lower()) for row in rows]
    vocab = {w: i for i, (w, _) in enumerate(Counter(w for words in tokenized for w in words).most_common(vocab_size))}
    labels = sorted({row["label"] for row in rows})
    features = torch.zeros(len(rows), vocab_size)
    for i, words in enumerate(tokenized):
        for word in words:
            if word in vocab:
                features[i, vocab[word]] += 1.0
    targets = torch.tensor([labels.index(row["label"]) for row in rows])
    return features, targets, len(labels)


def test_galore_adamw_trains_a_real_classifier(data_dir):
    features, targets, num_labels = _trec_bag_of_words(data_dir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features.shape[1], 96), nn.ReLU(), nn.Linear(96, num_labels))
    optimizer = GaLoreAdamW(
        galore_param_groups(model, rank=8, update_gap=20, scale=1.0, projector="svd", moment_policy="rotate"),
        lr=5e-3,
        weight_decay=0.01,
    )
    assert len(optimizer.projectors()) == 0 and len(optimizer.param_groups[0]["params"]) == 1  # the 96 x 600 layer

    def full_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(features), targets))

    initial = full_loss()
    generator = torch.Generator().manual_seed(1)
    for _ in range(120):
        index = torch.randint(0, len(targets), (64,), generator=generator)
        _train_step(model, optimizer, (features[index], targets[index]))
    final = full_loss()
    accuracy = float((model(features).argmax(1) == targets).float().mean())
    assert final < 0.5 * initial
    assert accuracy > 0.7  # 6 classes: chance is about 0.23 for the majority class
    assert optimizer.projectors()[0].last_refresh == 100


# ---- federated GaLore ----------------------------------------------------------------------------------------
def _federated_round(projectors, weights_now, deltas, client_weights):
    wire = projectors_to_wire(projectors)
    uploads = []
    for delta in deltas:
        client_projectors = projectors_from_wire(wire)
        after = {name: weights_now[name] + delta[name] for name in delta}
        uploads.append(client_projected_updates(client_projectors, weights_now, after))
    average = projected_average(uploads, client_weights, projectors)
    return {name: weights_now[name] + average[name].to(weights_now[name].dtype) for name in weights_now}


@pytest.mark.parametrize("kind", ["gaussian", "dct", "svd", "randomized-svd"])
def test_server_update_is_the_weighted_average_when_updates_lie_in_the_shared_span(kind):
    generator = torch.Generator().manual_seed(0)
    params = {
        "left": torch.randn(12, 20, generator=generator, dtype=torch.float64),
        "right": torch.randn(30, 10, generator=generator, dtype=torch.float64),
    }
    references = {name: torch.randn(w.shape, generator=generator, dtype=torch.float64) for name, w in params.items()}
    projectors = round_projectors(params, kind, rank=4, seed=1, server_round=3, references=references)
    client_weights = [3.0, 1.0, 2.0]
    # In span: ΔW_k = up(C_k) for random low-rank coordinates C_k.
    deltas = [
        {
            name: projectors[name].up(torch.randn(projectors[name].low_rank_shape(), generator=generator).double())
            for name in params
        }
        for _ in client_weights
    ]
    total = sum(client_weights)
    average = {name: sum(w / total * d[name] for w, d in zip(client_weights, deltas, strict=True)) for name in params}
    updated = _federated_round(projectors, params, deltas, client_weights)
    for name in params:
        assert torch.allclose(updated[name], params[name] + average[name], atol=1e-10)
    # Outside the span the server applies the orthogonal projection P Pᵀ of the average update.
    deltas = [
        {name: torch.randn(w.shape, generator=generator, dtype=torch.float64) for name, w in params.items()}
        for _ in client_weights
    ]
    average = {name: sum(w / total * d[name] for w, d in zip(client_weights, deltas, strict=True)) for name in params}
    updated = _federated_round(projectors, params, deltas, client_weights)
    for name, projector in projectors.items():
        projected = projector.up(projector.down(average[name]))
        assert torch.allclose(updated[name], params[name] + projected, atol=1e-10)
        assert not torch.allclose(updated[name], params[name] + average[name], atol=1e-3)
    projected_bytes, dense_bytes = projected_upload_bytes(projectors)
    assert projected_bytes == 4 * (4 * 20 + 30 * 4) and dense_bytes == 4 * (12 * 20 + 30 * 10)


def test_clients_training_galore_on_the_round_projector_upload_their_update_exactly():
    torch.manual_seed(0)
    global_weight = torch.randn(30, 20)
    server_projectors = round_projectors({"w": global_weight}, "gaussian", rank=5, seed=9, server_round=2)
    wire = projectors_to_wire(server_projectors)
    assert all(not isinstance(v, torch.Tensor) for v in wire["w"].values())  # a seed, not a basis
    uploads, full_deltas, sizes = [], [], [50, 20, 30]
    for client, size in enumerate(sizes):
        weight = nn.Parameter(global_weight.clone())
        optimizer = GaLoreAdamW(
            [{"params": [weight], "galore": True, "rank": 5, "update_gap": 0, "projector": "gaussian", "scale": 1.0}],
            lr=1e-2,
            weight_decay=0.0,  # full-space decay would leave the span
        )
        projectors = projectors_from_wire(wire)
        optimizer.set_projector(weight, projectors["w"])
        generator = torch.Generator().manual_seed(100 + client)
        inputs, target = torch.randn(size, 20, generator=generator), torch.randn(size, 30, generator=generator)
        for _ in range(6):
            loss = (inputs @ weight.T - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert optimizer.state[weight]["projector"].last_refresh == 2  # never refreshed locally
        delta = weight.detach() - global_weight
        full_deltas.append(delta)
        uploads.append(client_projected_updates(projectors, {"w": global_weight}, {"w": weight.detach()}))
        assert uploads[-1]["w"].shape == (30, 5)
    updated = {"w": global_weight + projected_average(uploads, sizes, server_projectors)["w"].float()}
    expected = global_weight + sum(n / sum(sizes) * d for n, d in zip(sizes, full_deltas, strict=True))
    assert torch.allclose(updated["w"], expected, atol=1e-6)


def test_round_projectors_validate_inputs():
    weight = torch.zeros(6, 8)
    with pytest.raises(ValueError, match="reference"):
        round_projectors({"w": weight}, "svd", rank=2, seed=0, server_round=1)
    with pytest.raises(ValueError, match="2-D"):
        round_projectors({"b": torch.zeros(6)}, "gaussian", rank=2, seed=0, server_round=1)
    with pytest.raises(ValueError, match="weights"):
        aggregate_projected([{"w": torch.zeros(2, 8)}], [1.0, 2.0])
    one = round_projectors({"w": weight}, "gaussian", rank=2, seed=0, server_round=1)["w"]
    two = round_projectors({"w": weight}, "gaussian", rank=2, seed=0, server_round=2)["w"]
    assert not torch.allclose(one.basis, two.basis)  # a fresh basis every round
