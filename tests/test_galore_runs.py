"""GaLore from the configuration (centralized and federated clients) and the fed-galore strategy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedlowrank.adapters import LayerFactors
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.fed_galore import client_projected_updates, projectors_from_wire, projectors_to_wire
from fedlowrank.galore import GaLoreAdamW, optimizer_state_breakdown, optimizer_state_bytes
from fedlowrank.galore_setup import fed_galore_modules, lora_base_weights
from fedlowrank.report import read_metrics
from strategies.method import RoundInput
from strategies.methods import fed_galore
from strategies.methods.fed_galore import FedGaLoreOptions, server_projectors


# ---- configuration ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of 'adamw', 'sgd', 'galore'"),
        ({"optimizer": "galore", "galore.rank": 8}, r"galore.rank=8 is not below lora.r=8.*galore.train-modules"),
        ({"optimizer": "galore", "galore.projector": "pca"}, "galore.projector must be one of"),
        ({"optimizer": "galore", "galore.moment-policy": "drop"}, "galore.moment-policy must be one of"),
        ({"galore.train-modules": ["key"]}, r"\['key'\] are not in lora.target-modules"),
        ({"strategy": "fed-galore", "galore.projector": "gaussian", "train.weight-decay": 0.01}, "weight-decay = 0"),
        ({"strategy": "fed-galore"}, "galore.projector = 'gaussian'"),
        ({"strategy": "fed-galore", "galore.projector": "gaussian", "optimizer": "sgd"}, "not 'sgd'"),
        ({"optimizer": "galore", "dp.epsilon": 3.0}, "does not support GaLore"),
    ],
)
def test_bad_galore_settings_fail_with_clear_messages(flat, fragment):
    from strategies.registry import resolve_method

    with pytest.raises(ConfigError, match=fragment):
        resolve_method(RunConfig.from_flat(flat))


def test_galore_keys_parse_from_overrides():
    config = RunConfig.from_flat(
        {"optimizer": "galore", "galore.rank": 2, "galore.target-modules": "value", "galore.include-head": "true"}
    )
    assert config.galore.rank == 2 and config.galore.target_modules == ["value"] and config.galore.include_head


# ---- optimizer = "galore" -------------------------------------------------------------------------------------
def _one_step_state_bytes(workspace, kind: str, config: RunConfig) -> tuple[torch.optim.Optimizer, int]:
    from fedlowrank.training import make_optimizer

    workspace.load_global({})
    model = workspace.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.train, kind, model=model, galore=config.galore)
    batch = next(iter(workspace.client_train_loader(0, seed=0)))
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    workspace.load_global({})
    return optimizer, optimizer_state_bytes(optimizer)


def test_galore_optimizer_projects_the_adapter_factors_and_keeps_less_state(tiny_config):
    from fedlowrank.runtime import get_workspace

    config = tiny_config(optimizer="galore", **{"galore.rank": 2})
    workspace = get_workspace(config)
    galore, galore_bytes = _one_step_state_bytes(workspace, "galore", config)
    _, adamw_bytes = _one_step_state_bytes(workspace, "adamw", config)
    assert isinstance(galore, GaLoreAdamW)
    assert len(galore.param_groups[0]["params"]) == 24 and galore.param_groups[0]["rank"] == 2  # 12 layers x (A, B)
    assert len(galore.projectors()) == 24
    # Factor moments shrink from 2 x (8 x 384) to 2 x (2 x 384) floats; the head's stay full.
    assert optimizer_state_breakdown(galore)["moments"] < 0.35 * adamw_bytes
    assert galore_bytes < adamw_bytes
    with pytest.raises(ConfigError, match="nothing to project"):
        _one_step_state_bytes(workspace, "galore", tiny_config(optimizer="galore", **{"galore.target-modules": "key"}))


def test_centralized_galore_learns_and_trains_unfrozen_base_weights(tiny_config):
    from fedlowrank.centralized import train_centralized
    from fedlowrank.runtime import get_workspace

    config = tiny_config(
        optimizer="galore",
        name="central-galore",
        **{
            "num-rounds": 3,
            "train.local-steps": 8,
            "galore.rank": 16,
            "galore.train-modules": ["query"],
            "galore.lr": 1e-3,
            "galore.update-gap": 4,
        },
    )
    summary = train_centralized(config)
    rows = read_metrics(summary["run_dir"])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    residuals = load_file(f"{summary['adapter']}/base_residuals.safetensors")
    assert len(residuals) == 6 and all(r.abs().max() > 0 for r in residuals.values())  # the 6 query weights
    # ... each a sum of rank-16 steps: its rank is at most 16 x (number of basis refreshes = 6 of 24 steps)
    assert all(torch.linalg.matrix_rank(r).item() <= 16 * 6 for r in residuals.values())
    workspace = get_workspace(config)
    assert not any(w.requires_grad for w in lora_base_weights(workspace.model, ["query"]).values())


def test_federated_clients_train_with_galore(tiny_config):
    from simulations.run import run_inprocess

    config = tiny_config(optimizer="galore", name="fedit-galore", **{"num-rounds": 3, "train.local-steps": 6})
    rows = read_metrics(run_inprocess(config)["run_dir"])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["clients_trained"] == 3


def test_lora_strategies_refuse_unfrozen_base_weights(tiny_config):
    from simulations.run import run_inprocess

    config = tiny_config(optimizer="galore", **{"galore.train-modules": ["query"], "galore.rank": 16})
    with pytest.raises(ConfigError, match="does not aggregate"):
        run_inprocess(config)


# ---- fed-galore: pure server math -----------------------------------------------------------------------------
def test_server_update_is_the_weighted_average_of_in_span_client_updates():
    shapes = {"a.query": (12, 20), "b.value": (30, 10)}
    projectors = server_projectors(shapes, rank=4, seed=3, server_round=2)
    # A client rebuilds the same bases from the broadcast compact state (a seed, no tensor).
    clients = projectors_from_wire(projectors_to_wire(projectors))
    for layer in shapes:
        assert torch.equal(clients[layer].basis, projectors[layer].basis)
    generator = torch.Generator().manual_seed(0)
    weights = [10.0, 30.0, 20.0]
    deltas = [
        {layer: p.up(torch.randn(p.low_rank_shape(), generator=generator)) for layer, p in clients.items()}
        for _ in weights
    ]
    zeros = {layer: torch.zeros(shape) for layer, shape in shapes.items()}
    uploads = [
        {f"{layer}.projected": low for layer, low in client_projected_updates(clients, zeros, delta).items()}
        for delta in deltas
    ]
    previous = {  # the LoRA layers the weights belong to (their factors stay untouched)
        layer: LayerFactors(A=torch.zeros(8, shape[1]), B=torch.zeros(shape[0], 8)) for layer, shape in shapes.items()
    }
    options = FedGaLoreOptions(rank=4, modules=("query", "value"))

    def update(chosen, weight_list):
        weights_t = torch.tensor(weight_list, dtype=torch.float64) / sum(weight_list)
        inputs = RoundInput([{}] * len(chosen), weights_t, previous, 2, uploads=chosen, seed=3)
        return fed_galore.server_update(inputs, options)

    result = update(uploads, weights)
    for layer in shapes:
        expected = sum(w / 60.0 * d[layer].double() for w, d in zip(weights, deltas, strict=True))
        torch.testing.assert_close(result.fold[layer], expected, rtol=0, atol=1e-6)
        assert result.factors[layer] is previous[layer]
    # one client: the fold is its own update
    first = update(uploads[:1], [1.0])
    torch.testing.assert_close(first.fold["a.query"], deltas[0]["a.query"].double(), rtol=0, atol=1e-6)
    assert result.metrics["galore_projected_bytes"] < result.metrics["galore_dense_bytes"]


# ---- fed-galore: in Flower -----------------------------------------------------------------------------------
def _fed_galore_config(tiny_config, **overrides):
    flat = {
        "strategy": "fed-galore",
        "optimizer": "galore",
        "galore.projector": "gaussian",
        "galore.rank": 16,
        "galore.scale": 1.0,
        "galore.lr": 1e-3,
    }
    flat.update(overrides)
    return tiny_config(**flat)


def test_fed_galore_server_update_equals_the_weighted_average_of_client_updates(tiny_config, monkeypatch):
    import fedlowrank.training as training
    from simulations.run import run_inprocess

    recorded = []
    original = training.train_local

    def recording(model, loader, *args, **kwargs):  # the client's full-weight update, before it restores W
        weights = lora_base_weights(model, fed_galore_modules(config.galore, config.lora.target_modules))
        before = {layer: w.detach().clone() for layer, w in weights.items()}
        result = original(model, loader, *args, **kwargs)
        recorded.append((result.dataset_size, {layer: w.detach() - before[layer] for layer, w in weights.items()}))
        return result

    monkeypatch.setattr(training, "train_local", recording)
    config = _fed_galore_config(tiny_config, name="fed-galore-exact", **{"num-rounds": 1, "train.local-steps": 4})
    summary = run_inprocess(config)
    server = load_file(f"{summary['adapter']}/base_residuals.safetensors")
    assert len(recorded) == 3 and len(server) == 12
    total = sum(size for size, _ in recorded)
    for layer, residual in server.items():
        expected = sum(size / total * delta[layer].double() for size, delta in recorded)
        assert expected.abs().max() > 1e-4  # the clients really moved the weight
        torch.testing.assert_close(residual.double(), expected, rtol=0, atol=1e-6)
        # every client's full update lies in the round's rank-16 span
        assert torch.linalg.matrix_rank(recorded[0][1][layer].double(), atol=1e-6).item() <= 16


def test_fed_galore_learns_and_uploads_only_projected_updates(tiny_config):
    from fedlowrank.runtime import get_workspace
    from simulations.run import run_inprocess

    config = _fed_galore_config(tiny_config, name="fed-galore-run", **{"num-rounds": 3, "train.local-steps": 6})
    summary = run_inprocess(config)
    rows = read_metrics(summary["run_dir"])
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    # Up: 12 x (16 x 384) fp32 projected updates plus the head (6 x 384 + 6), plus per-key overhead.
    projected = 12 * 16 * 384 * 4
    head = (6 * 384 + 6) * 4
    assert rows[0]["galore_projected_bytes"] == projected and rows[0]["galore_dense_bytes"] == 12 * 384 * 384 * 4
    assert projected + head <= rows[0]["bytes_up_per_client"] < projected + head + 4096
    # Down: the head in round 1; from round 2 on also every trained W − W0 in full (honest, dense).
    assert rows[0]["bytes_down_per_client"] < head + 4096
    assert rows[1]["bytes_down_per_client"] >= 12 * 384 * 384 * 4
    workspace = get_workspace(config)  # the clients froze the base weights again after training
    assert not any(w.requires_grad for w in lora_base_weights(workspace.model, ["query", "value"]).values())
