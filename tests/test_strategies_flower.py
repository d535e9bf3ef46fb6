"""The methods inside Flower: shared-A checks, per-client state, residual folding, and full runs."""

from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from fedlowrank.adapters import (
    LayerFactors,
    adapter_state,
    attach_lora,
    base_weights,
    factor_state,
    lora_factors,
    set_base_residuals,
)
from fedlowrank.config import LoraSettings
from fedlowrank.models import load_model
from fedlowrank.protocol import TrainReply, a_checksum
from fedlowrank.protocol.flower import encode_reply
from fedlowrank.report import read_metrics
from fedlowrank.state import DiskStateStore
from strategies.strategy import LoRAStrategy


@pytest.fixture(autouse=True)
def _task_identity():
    from simulations.grids import adopt_server_identity

    adopt_server_identity()


def _reply(arrays, num_examples, node, checksum=None):
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    reply = TrainReply(node, num_examples, arrays, train_loss=1.0, num_steps=1, train_time=0.0, a_checksum=checksum)
    return Message(encode_reply(reply), reply_to=instruction)


def test_ffa_rejects_a_client_whose_frozen_a_differs():
    generator = torch.Generator().manual_seed(0)
    initial = factor_state({"l0": LayerFactors(A=torch.randn(2, 6, generator=generator), B=torch.zeros(5, 2))})
    strategy = LoRAStrategy.for_method("ffa", initial)
    good = a_checksum(initial)
    tampered = dict(initial)
    tampered["l0.lora_A.weight"] = initial["l0.lora_A.weight"] + 1e-7
    b_ones, b_twos = {"l0.lora_B.weight": torch.ones(5, 2)}, {"l0.lora_B.weight": 2 * torch.ones(5, 2)}
    result = strategy.train_round(
        1, [_reply(b_ones, 10, 1, good), _reply(b_twos, 10, 2, a_checksum(tampered)), _reply(b_ones, 10, 3, None)]
    )
    assert set(result.rejected) == {"2", "3"} and all("checksum" in why for why in result.rejected.values())
    assert set(result.arrays.keys()) == {"l0.lora_B.weight"}  # A never travels
    torch.testing.assert_close(strategy.global_state["l0.lora_B.weight"], torch.ones(5, 2))
    assert result.metrics["bias_rel_max"] < 1e-7


def test_residuals_follow_each_layer_orientation():
    """ΔW is given as d_out x d_in; nn.Linear (BERT) and Conv1D (GPT-2, fan_in_fan_out) both see x·ΔWᵀ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    cases = [
        (attach_lora(load_model("minilm", num_labels=2), LoraSettings(r=2, target_modules=["query"])), 384, 384),
        (attach_lora(gpt2, LoraSettings(r=2, target_modules=["c_attn"]), task="causal-lm"), 48, 16),
    ]
    for model, d_out, d_in in cases:
        originals = base_weights(model)
        layer = sorted(originals)[0]
        base = model.get_submodule(layer).base_layer
        x = torch.randn(3, d_in)
        before = base(x)
        delta = torch.randn(d_out, d_in)
        set_base_residuals(model, originals, {layer: delta})
        torch.testing.assert_close(base(x) - before, x @ delta.T, rtol=1e-4, atol=1e-4)
        set_base_residuals(model, originals, {})
        torch.testing.assert_close(base(x), before)


@pytest.mark.parametrize("store_kind", ["context", "disk"])
def test_client_state_stores_round_trip(store_kind, tmp_path):
    from flwr.app import Context

    from clients.state import ContextStateStore

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store = ContextStateStore(context) if store_kind == "context" else DiskStateStore(tmp_path)
    assert store.load("7", "local", upto=9) is None
    tensors = {"b": torch.randn(3, 2), "head": torch.arange(4.0)}
    store.save("7", "local", tensors, version=2)
    tensors["b"].add_(1)  # the store kept its own copy
    loaded = store.load("7", "local", upto=2)
    assert torch.equal(loaded["head"], torch.arange(4.0))
    assert not torch.equal(loaded["b"], tensors["b"])
    # versions: a round reads what the rounds before it saved; two versions are kept
    assert store.load("7", "local", upto=1) is None
    store.save("7", "local", {"head": torch.ones(4)}, version=4)
    store.save("7", "local", {"head": 2 * torch.ones(4)}, version=5)
    assert torch.equal(store.load("7", "local", upto=4)["head"], torch.ones(4))
    assert torch.equal(store.load("7", "local", upto=9)["head"], 2 * torch.ones(4))
    assert store.load("7", "local", upto=3) is None  # version 2 was pruned once 4 and 5 existed
    store.save("7", "local", {"head": 3 * torch.ones(4)}, version=5)  # a round run again after a crash
    assert torch.equal(store.load("7", "local", upto=4)["head"], torch.ones(4))


def test_fedsa_keeps_a_distinct_b_per_client_across_rounds(tiny_config):
    from clients.client_app import make_client_app
    from clients.node import LAST_TRAINED_A, LOCAL_ADAPTER
    from clients.state import ContextStateStore
    from simulations.grids import InProcessGrid
    from strategies.server_app import run_server

    config = tiny_config(strategy="fedsa", **{"num-rounds": 1})
    grid = InProcessGrid(make_client_app(config), config.num_clients, config.to_flat(), seed=0)
    run_server(grid, config)
    after_one = {nid: ContextStateStore(ctx).load("", LOCAL_ADAPTER, upto=10**9) for nid, ctx in grid.contexts.items()}
    config.num_rounds = 3
    config.name = "fedsa-3"
    run_server(grid, config)  # the same nodes (same Contexts) continue for three more rounds
    after_more = {nid: ContextStateStore(ctx).load("", LOCAL_ADAPTER, upto=10**9) for nid, ctx in grid.contexts.items()}

    b_keys = [k for k in next(iter(after_more.values())) if ".lora_B." in k]
    assert b_keys and all("classifier" in k or ".lora_B." in k for k in next(iter(after_more.values())))
    states = list(after_more.values())
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            assert not torch.equal(states[i][b_keys[0]], states[j][b_keys[0]])  # each client its own B
    for nid in grid.contexts:
        assert torch.count_nonzero(after_one[nid][b_keys[0]]) > 0  # trained in round 1 (from B = 0)
        assert not torch.equal(after_one[nid][b_keys[0]], after_more[nid][b_keys[0]])  # and kept training
        assert ContextStateStore(grid.contexts[nid]).load("", LAST_TRAINED_A, upto=10**9) is not None
    rows = read_metrics(config.output_dir + "/fedsa-3")
    assert all(row["personalization_gap"] > 0 for row in rows[1:])
    assert rows[-1]["test_eval"] == "personalized-mean" and rows[-1]["test_accuracy"] is not None
    assert "bias_rel_mean" not in rows[-1]
    # only A (and no B, no local head) ever travelled up
    assert rows[-1]["bytes_up"] < rows[-1]["bytes_down"] * 1.01


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora", "fedsa"])
def test_every_strategy_runs_end_to_end_and_logs_bias(strategy, tiny_config):
    from simulations.run import run_inprocess

    config = tiny_config(strategy=strategy, name=f"run-{strategy}")
    summary = run_inprocess(config)
    rows = read_metrics(summary["run_dir"])
    assert len(rows) == 2 and rows[-1]["clients_trained"] == 3
    assert rows[-1]["test_accuracy"] is not None
    if strategy == "fedsa":
        return
    biases = [row["bias_rel_mean"] for row in rows]
    per_layer = rows[-1]["bias_rel_per_layer"]
    assert len(per_layer) == 12 and max(per_layer.values()) == pytest.approx(rows[-1]["bias_rel_max"])
    if strategy in ("ffa", "fedsvd", "fedex", "flora"):
        assert max(biases) < 1e-5
    else:
        assert min(biases) > 1e-4


def test_ffa_clients_share_a_bit_identical_a_in_a_real_run(tiny_config):
    from simulations.run import run_inprocess

    summary = run_inprocess(tiny_config(strategy="ffa", name="ffa-shared"))
    rows = read_metrics(summary["run_dir"])
    assert all(row["clients_rejected"] == 0 for row in rows)
    # the global A after training is still the seeded initial A
    from fedlowrank.runtime import get_workspace

    workspace = get_workspace(tiny_config(strategy="ffa"))
    initial_a = {k: v for k, v in workspace.initial_state.items() if ".lora_A." in k}
    workspace.load_global({})
    current = adapter_state(workspace.model)
    assert all(torch.equal(current[k], v) for k, v in initial_a.items())
    assert len(lora_factors(current)) == 12


def test_fedsa_client_state_on_disk(tiny_config, tmp_path):
    from safetensors.torch import load_file

    from simulations.run import run_inprocess

    state_dir = tmp_path / "client-state"
    config = tiny_config(
        strategy="fedsa",
        name="fedsa-disk",
        **{"client-state": "disk", "client-state-dir": str(state_dir)},
    )
    run_inprocess(config)
    key = (Path(config.output_dir) / "fedsa-disk" / "run-key").read_text()  # the run's own folder in the state
    files = sorted((state_dir / key).glob("*/local-adapter@2.safetensors"))  # versioned by the round that saved it
    assert [f.parent.name for f in files] == ["0", "1", "2"]
    b_key = next(k for k in load_file(str(files[0])) if ".lora_B." in k)
    assert not torch.equal(load_file(str(files[0]))[b_key], load_file(str(files[1]))[b_key])


def test_fedsa_vera_shares_lambda_d_and_keeps_lambda_b_local(tiny_config):
    from clients.client_app import make_client_app
    from clients.node import LOCAL_ADAPTER
    from clients.state import ContextStateStore
    from fedlowrank.adapters import key_role
    from simulations.grids import InProcessGrid
    from strategies.server_app import run_server

    config = tiny_config(strategy="fedsa", name="fedsa-vera", **{"lora.adapter": "vera", "lora.r": 16})
    grid = InProcessGrid(make_client_app(config), config.num_clients, config.to_flat(), seed=0)
    run_server(grid, config)
    local = [ContextStateStore(ctx).load("", LOCAL_ADAPTER, upto=10**9) for ctx in grid.contexts.values()]
    assert {key_role(k) for k in local[0]} == {"B", "head"}
    lambda_b = next(k for k in local[0] if key_role(k) == "B")
    assert not torch.equal(local[0][lambda_b], local[1][lambda_b])  # each client its own λ_b
    rows = read_metrics(f"{config.output_dir}/fedsa-vera")
    per_client_up = rows[-1]["bytes_up_per_client"]
    assert per_client_up < 12 * 384 * 4  # only the 12 λ_d vectors (16 floats each): less than λ_b alone
    assert rows[-1]["client_eval_accuracy"] is not None


def test_ffa_with_vera_freezes_and_checks_the_shared_side(tiny_config):
    from simulations.run import run_inprocess

    summary = run_inprocess(tiny_config(strategy="ffa", name="ffa-vera", **{"lora.adapter": "vera", "lora.r": 16}))
    rows = read_metrics(summary["run_dir"])
    assert all(row["clients_rejected"] == 0 for row in rows)


def test_a_stateful_method_gets_back_the_state_it_returned():
    """``ServerUpdate.state`` comes back as the next round's ``RoundInput.state`` (a method stays a pure function)."""
    from strategies.method import MethodDefinition, MethodSpec, NoOptions, ServerUpdate
    from strategies.registry import ResolvedMethod
    from strategies.strategy import Sampling

    seen = []

    def counting(inputs, options):
        seen.append({k: v.clone() for k, v in inputs.state.items()})
        count = inputs.state.get("rounds", torch.zeros(1)) + 1
        return ServerUpdate(factors=dict(inputs.previous), state={"rounds": count})

    method = ResolvedMethod(MethodDefinition("probe", MethodSpec(), counting), NoOptions(), MethodSpec())
    initial = factor_state({"l0": LayerFactors(A=torch.ones(2, 6), B=torch.zeros(5, 2))})
    strategy = LoRAStrategy(method, initial, scale=1.0, sampling=Sampling(1.0, 1.0, 1))
    for server_round in (1, 2, 3):
        strategy.train_round(server_round, [_reply(dict(initial), 10, 1)])
    assert [s.get("rounds") for s in seen] == [None, torch.ones(1), 2 * torch.ones(1)]
    assert torch.equal(strategy.method_state["rounds"], torch.tensor([3.0]))
