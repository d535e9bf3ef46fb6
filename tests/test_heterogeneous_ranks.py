"""Heterogeneous client ranks for FLoRA and FlexLoRA: exact math in float64, and real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlowrank.adapters import LayerFactors, client_rank, slice_rank
from fedlowrank.config import ConfigError
from fedlowrank.lowrank import pad_rank
from strategies.method import RoundInput
from strategies.methods import flexlora, flora

D_OUT, D_IN, R = 14, 11, 6
RANKS = (1, 3, 6)


def _clients(seed=0):
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for r_k in RANKS:
        b = torch.randn(D_OUT, r_k, generator=gen, dtype=torch.float64)
        a = torch.randn(r_k, D_IN, generator=gen, dtype=torch.float64)
        clients.append((b, a))
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    target = sum(w * b @ a for w, (b, a) in zip(weights, clients, strict=True))
    padded = [{"l": LayerFactors(*reversed(pad_rank(b, a, R)))} for b, a in clients]
    previous = {
        "l": LayerFactors(A=torch.zeros(R, D_IN, dtype=torch.float64), B=torch.zeros(D_OUT, R, dtype=torch.float64))
    }
    return padded, weights, previous, target


def test_padding_keeps_each_clients_product():
    b, a = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    pb, pa = pad_rank(b, a, 4)
    assert pb.shape == (5, 4) and pa.shape == (4, 7)
    torch.testing.assert_close(pb @ pa, b @ a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exceed"):
        pad_rank(pb, pa, 3)


def test_flora_merges_the_exact_weighted_sum_of_mixed_rank_products():
    clients, weights, previous, target = _clients()
    update = flora.server_update(RoundInput(clients, weights, previous, 1))
    torch.testing.assert_close(update.fold["l"], target, rtol=1e-12, atol=1e-12)
    assert update.factors["l"].A.shape == (R, D_IN) and not update.factors["l"].B.any()


def test_flexlora_gives_each_client_the_best_approximation_of_its_rank():
    clients, weights, previous, target = _clients(seed=1)
    update = flexlora.server_update(RoundInput(clients, weights, previous, 1))
    singular = torch.linalg.svdvals(target)
    for r_k in RANKS:
        b_k, a_k = update.factors["l"].B[:, :r_k], update.factors["l"].A[:r_k]  # what a rank-r_k client keeps
        error = torch.linalg.matrix_norm(target - b_k @ a_k)
        # Eckart–Young: the truncation error of the best rank-r_k approximation
        assert float(error) == pytest.approx(float(singular[r_k:].pow(2).sum().sqrt()), rel=1e-9, abs=1e-12)


def test_client_rank_cycles_and_slicing_sends_only_leading_components():
    assert [client_rank([2, 4], pid, 8) for pid in range(4)] == [2, 4, 2, 4]
    assert client_rank([], 3, 8) == 8
    state = {
        "base_model.model.x.query.lora_A.weight": torch.randn(8, 5),
        "base_model.model.x.query.lora_B.weight": torch.randn(7, 8),
        "base_model.model.classifier.modules_to_save.weight": torch.randn(3, 5),
    }
    sliced = slice_rank(state, 2)
    assert sliced["base_model.model.x.query.lora_A.weight"].shape == (2, 5)
    assert sliced["base_model.model.x.query.lora_B.weight"].shape == (7, 2)
    assert torch.equal(
        sliced["base_model.model.classifier.modules_to_save.weight"],
        state["base_model.model.classifier.modules_to_save.weight"],
    )


def test_heterogeneous_ranks_are_refused_where_unsupported(tiny_config):
    from strategies.registry import resolve_method

    with pytest.raises(ConfigError, match="flora"):
        resolve_method(tiny_config(**{"strategy": "fedit", "lora.client-ranks": [2, 4, 8]}))
    with pytest.raises(ConfigError, match="1..lora.r"):
        tiny_config(**{"strategy": "flora", "lora.client-ranks": [2, 16]})


@pytest.mark.parametrize("strategy", ["flora", "flexlora"])
def test_mixed_rank_federation_runs_and_uploads_fewer_bytes(tiny_config, strategy):
    from simulations.run import run_inprocess

    rows = {}
    for label, ranks in (("same", []), ("mixed", [2, 4, 8])):
        config = tiny_config(**{"strategy": strategy, "lora.client-ranks": ranks, "name": f"{strategy}-{label}"})
        run_inprocess(config)
        path = Path(config.output_dir) / config.name / "metrics.jsonl"
        rows[label] = [json.loads(line) for line in path.open()]
    # factor bytes scale with r_k: (2 + 4 + 8) / (3 · 8) of the factors, plus the same head for everyone
    assert rows["mixed"][0]["bytes_up"] < 0.75 * rows["same"][0]["bytes_up"]
    assert rows["mixed"][-1]["test_accuracy"] is not None
    assert rows["mixed"][-1]["train_loss"] < rows["mixed"][0]["train_loss"] * 1.5
