"""The batched multi-client engine gives each client the update it would get training alone."""

from __future__ import annotations

import pytest
import torch
from conftest import fixed_dp_plan

from fedlowrank.adapters import adapter_state, load_adapter_state, set_trainable
from fedlowrank.config import TrainSettings
from fedlowrank.data import PaddedRows
from fedlowrank.engine import ClientJob, PlainData, PrivateData, train_batched
from fedlowrank.runtime import get_workspace
from fedlowrank.training import planned_steps, train_local


@pytest.fixture()
def workspace(tiny_config):
    ws = get_workspace(tiny_config())
    dropouts = [m for m in ws.model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]
    for m in dropouts:  # dropout masks depend on batch composition; the update math must not
        m.p = 0.0
    yield ws
    for m, p in zip(dropouts, saved, strict=True):
        m.p = p
    load_adapter_state(ws.model, ws.initial_state)
    set_trainable(ws.model, lora_a=True, lora_b=True, head=True)


def _start_states(ws, count):
    gen = torch.Generator().manual_seed(11)
    states = []
    for _ in range(count):  # different non-zero B per client, as after a few rounds of FedSA
        state = dict(ws.initial_state)
        for key in state:
            if "lora_B" in key:
                state[key] = 0.02 * torch.randn(state[key].shape, generator=gen)
        states.append(state)
    return states


def _sequential(ws, starts, settings, kind):
    ends = []
    for pid, start in enumerate(starts):
        load_adapter_state(ws.model, start)
        train_local(ws.model, ws.client_train_loader(pid, seed=5 + pid), settings, kind, seed=5 + pid)
        ends.append(adapter_state(ws.model))
    return ends


@pytest.mark.parametrize(
    ("settings", "kind", "trains_a"),
    [
        (TrainSettings(local_steps=3, batch_size=8, lr=5e-3), "adamw", True),  # equal steps
        (TrainSettings(local_epochs=0.3, batch_size=8, lr=0.05, max_grad_norm=0.5), "sgd", True),  # uneven
        # uneven (3, 2 and 5 steps): a client that is done leaves the stacks with its rows of AdamW's moments
        (TrainSettings(local_epochs=0.3, batch_size=8, lr=5e-3, weight_decay=0.01), "adamw", True),
        (TrainSettings(local_steps=2, batch_size=8, lr=5e-3), "adamw", False),  # B only (FFA, FedSVD)
    ],
)
def test_batched_clients_match_sequential_training(workspace, settings, kind, trains_a):
    set_trainable(workspace.model, lora_a=trains_a, lora_b=True, head=True)
    starts = _start_states(workspace, 3)
    expected = _sequential(workspace, starts, settings, kind)
    load_adapter_state(workspace.model, workspace.initial_state)
    before_model = adapter_state(workspace.model)
    jobs = [
        ClientJob(start, PlainData(workspace.client_train_loader(pid, seed=5 + pid)), 5 + pid)
        for pid, start in enumerate(starts)
    ]
    results = train_batched(workspace.model, jobs, settings, kind)
    sizes = [len(workspace.client_train_dataset(pid)) for pid in range(3)]
    for k, ((state, result), want) in enumerate(zip(results, expected, strict=True)):
        for key in want:
            moved = (want[key] - starts[k][key]).norm()
            error = (state[key] - want[key]).norm()
            assert error <= 1e-4 * max(float(moved), 1e-6) + 1e-7, (k, key, float(error), float(moved))
        assert result.dataset_size == sizes[k]
        assert result.num_steps == planned_steps(settings, sizes[k])
    # the shared model itself is untouched and its forwards restored
    after_model = adapter_state(workspace.model)
    assert all(torch.equal(after_model[k], before_model[k]) for k in after_model)
    assert all("forward" not in vars(m) for m in workspace.model.modules())
    if not trains_a:
        for (state, _), start in zip(results, starts, strict=True):
            assert all(torch.equal(state[k], start[k]) for k in state if "lora_A" in k)


def _final_adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize(("strategy", "wave_size"), [("fedit", 0), ("fedsa", 2), ("ffa", 0)])
def test_batched_grid_runs_the_same_federation_as_the_sequential_path(workspace, tiny_config, strategy, wave_size):
    """Same strategy code, same messages: the batched engine's run ends where the ClientApp-by-ClientApp run ends
    (FedSA in waves of 2 of its 3 clients: each client's own B waits in its state between waves and rounds)."""
    import json
    from pathlib import Path

    from simulations.run import run_inprocess

    finals, losses = {}, {}
    for engine in ("sequential", "batched"):
        config = tiny_config(
            **{"strategy": strategy, "engine": engine, "engine-wave-size": wave_size, "name": f"{strategy}-{engine}"}
        )
        load_adapter_state(workspace.model, workspace.initial_state)
        run_inprocess(config)
        run_dir = Path(config.output_dir) / config.name
        finals[engine] = _final_adapter(run_dir)
        losses[engine] = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
    # 1e-3 of the adapter's norm: AdamW's first step (g/|g|) turns float rounding in near-zero gradients into
    # ±lr flips (seen at 1.4e-4 in one CI run); a misrouted client or a lost step moves it by ~lr·√n ≈ 0.3.
    for key, want in finals["sequential"].items():
        assert (finals["batched"][key] - want).norm() <= 1e-3 * want.norm() + 1e-6, key
    assert losses["batched"] == pytest.approx(losses["sequential"], rel=1e-4)


@pytest.mark.parametrize(
    ("sigma", "clip", "kind", "trains_a"),
    [
        (0.0, 1e3, "sgd", True),  # σ from a budget of 50 (small), nothing clipped
        (0.0, 0.05, "adamw", True),  # σ from a budget of 50 (small), every example clipped
        (0.8, 0.5, "adamw", True),  # noise on: each client's own noise stream, as Opacus draws it
        (0.8, 0.5, "sgd", False),  # B only (FFA, FedSVD under DP)
    ],
)
def test_batched_dp_sgd_matches_each_client_training_alone(workspace, sigma, clip, kind, trains_a):
    """Per-client per-example clipping and noise inside the shared pass = ``train_private`` (Opacus) per client.
    The engine draws its Poisson batches from the split collated once (``client_train_examples``), Opacus from
    the Arrow rows and the collator: the same examples either way."""
    from fedlowrank.privacy.accounting import PrivacyAccountant
    from fedlowrank.privacy.dp_sgd import train_private

    set_trainable(workspace.model, lora_a=trains_a, lora_b=True, head=True)
    settings = TrainSettings(local_steps=3, batch_size=8, lr=5e-3)
    starts = _start_states(workspace, 3)
    datasets = [workspace.client_train_dataset(pid) for pid in range(3)]
    plans = [fixed_dp_plan(len(d), sigma, local_steps=2 + pid) for pid, d in enumerate(datasets)]  # uneven steps
    clips = [clip * (1 - 0.25 * pid) for pid in range(3)]  # each client's own C, kept when a done client leaves
    expected, accountants = [], []
    for pid, start in enumerate(starts):
        load_adapter_state(workspace.model, start)
        accountant = PrivacyAccountant()
        train_private(
            workspace.model,
            datasets[pid],
            workspace.collator,
            settings,
            plans[pid],
            accountant,
            max_grad_norm=clips[pid],
            engine="hooks",
            optimizer_kind=kind,
            seed=7 + pid,
        )
        expected.append(adapter_state(workspace.model))
        accountants.append(accountant)
    load_adapter_state(workspace.model, workspace.initial_state)
    examples = [workspace.client_train_examples(pid) for pid in range(3)]
    for (rows, _), dataset in zip(examples, datasets, strict=True):  # the gather, not Arrow reads
        assert isinstance(rows, PaddedRows) and len(rows) == len(dataset)
    jobs = [
        ClientJob(start, PrivateData(*examples[pid], plans[pid], PrivacyAccountant(), clips[pid]), 7 + pid)
        for pid, start in enumerate(starts)
    ]
    results = train_batched(workspace.model, jobs, settings, kind)
    for k, ((state, result), want) in enumerate(zip(results, expected, strict=True)):
        for key in want:
            moved = (want[key] - starts[k][key]).norm()
            error = (state[key] - want[key]).norm()
            assert error <= 1e-4 * max(float(moved), 1e-6) + 1e-6, (k, key, float(error), float(moved))
        assert result.num_steps == plans[k].steps_per_round
        assert jobs[k].data.accountant.history == accountants[k].history
        assert result.epsilon == pytest.approx(accountants[k].epsilon(1e-5), rel=1e-12)
    if not trains_a:
        for (state, _), start in zip(results, starts, strict=True):
            assert all(torch.equal(state[k], start[k]) for k in state if "lora_A" in k)
    assert all("forward" not in vars(m) for m in workspace.model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in workspace.model.parameters())


def test_batched_dp_refuses_a_round_past_the_budget_before_training(workspace):
    from fedlowrank.privacy.accounting import PrivacyAccountant, PrivacyBudgetExceeded

    dataset = workspace.client_train_dataset(0)
    plan = fixed_dp_plan(len(dataset), 0.6, local_steps=40, budget=1.0)
    accountant = PrivacyAccountant()
    job = ClientJob(workspace.initial_state, PrivateData(dataset, workspace.collator, plan, accountant, 1.0))
    with pytest.raises(PrivacyBudgetExceeded):
        train_batched(workspace.model, [job], TrainSettings(local_steps=40, batch_size=8))
    assert accountant.history == []


def test_batched_grid_runs_dp_federation_like_the_sequential_path(workspace, tiny_config):
    """DP-SGD clients through BatchedGrid: same final adapter and the same per-client ε ledger as one by one."""
    import json
    from pathlib import Path

    from simulations.run import run_inprocess

    finals, ledgers = {}, {}
    for engine in ("sequential", "batched"):
        config = tiny_config(
            **{
                "strategy": "ffa",
                "engine": engine,
                "name": f"dp-{engine}",
                "dp.epsilon": 8.0,
                "dp.max-grad-norm": 0.5,
                "train.local-steps": 2,
            }
        )
        load_adapter_state(workspace.model, workspace.initial_state)
        run_inprocess(config)
        run_dir = Path(config.output_dir) / config.name
        finals[engine] = _final_adapter(run_dir)
        ledgers[engine] = [json.loads(line)["dp_epsilon_per_client"] for line in (run_dir / "metrics.jsonl").open()]
    for key, want in finals["sequential"].items():
        assert (finals["batched"][key] - want).norm() <= 1e-4 * want.norm() + 1e-6, key
    assert ledgers["batched"] == ledgers["sequential"]
    assert max(ledgers["batched"][-1].values()) <= 8.0


def test_dp_lr_is_the_learning_rate_of_dp_sgd_clients_on_both_engines(workspace, tiny_config):
    """``dp.lr`` replaces ``train.lr`` for DP-SGD clients, sequential or batched; without DP-SGD it is unused."""
    from pathlib import Path

    from fedlowrank.config import DPSettings
    from simulations.run import run_inprocess

    finals = {}
    cases = {
        "train-lr": ("sequential", 0.05, 0.0),
        "dp-lr": ("sequential", 0.9, 0.05),
        "batched": ("batched", 0.9, 0.05),
    }
    for name, (engine, lr, dp_lr) in cases.items():
        config = tiny_config(
            **{"name": name, "engine": engine, "optimizer": "sgd", "train.lr": lr, "dp.lr": dp_lr,
               "dp.epsilon": 8.0, "train.local-steps": 2, "num-rounds": 1}
        )  # fmt: skip
        load_adapter_state(workspace.model, workspace.initial_state)
        run_inprocess(config)
        finals[name] = _final_adapter(Path(config.output_dir) / config.name)
    start = workspace.initial_state
    assert any((finals["train-lr"][k] - start[k]).abs().max() > 0 for k in finals["train-lr"])  # it trained
    for key, want in finals["train-lr"].items():
        assert torch.equal(finals["dp-lr"][key], want), key
        assert (finals["batched"][key] - want).norm() <= 1e-4 * want.norm() + 1e-6, key
    settings = TrainSettings(lr=0.01)
    assert DPSettings(epsilon=0.0, lr=0.3).local_train(settings) is settings  # no DP-SGD: train.lr
    assert DPSettings(epsilon=3.0, lr=0.3).local_train(settings).lr == 0.3


@pytest.mark.parametrize("private", [False, True])
def test_length_sorted_chunks_give_the_same_updates_as_one_pass(workspace, private):
    """Chunking a step by padded tokens (per-chunk padding) changes neither plain nor DP-SGD updates."""
    from fedlowrank.privacy.accounting import PrivacyAccountant

    settings = TrainSettings(local_steps=2, batch_size=8, lr=5e-3)
    starts = _start_states(workspace, 3)

    def jobs():
        if not private:
            return [
                ClientJob(s, PlainData(workspace.client_train_loader(pid, seed=3 + pid)), 3 + pid)
                for pid, s in enumerate(starts)
            ]
        out = []
        for pid, start in enumerate(starts):
            data = workspace.client_train_dataset(pid)
            dp_data = PrivateData(
                data, workspace.collator, fixed_dp_plan(len(data), 0.7, local_steps=2), PrivacyAccountant(), 0.5
            )
            out.append(ClientJob(start, dp_data, 3 + pid))
        return out

    # SGD: the update is linear in the gradient (AdamW's first step, g/|g|, magnifies float rounding)
    whole = train_batched(workspace.model, jobs(), settings, "sgd", max_tokens=0)
    chunked = train_batched(workspace.model, jobs(), settings, "sgd", max_tokens=40)  # a few examples per chunk
    for k, ((state, _), (want, _)) in enumerate(zip(chunked, whole, strict=True)):
        for key in want:
            moved = (want[key] - starts[k][key]).norm()
            assert (state[key] - want[key]).norm() <= 1e-4 * max(float(moved), 1e-6) + 1e-7, key


def test_a_client_that_diverges_in_a_batched_wave_fails_alone(workspace, tiny_config):
    """FedSA, 3 clients in one wave; client 1's own B (kept from an earlier round) is NaN, so its training
    diverges. It gets an error reply saying so; clients 0 and 2 get the replies the ClientApp gives them one
    by one (the wave goes on, as three separate clients would)."""
    from flwr.app import Context, Message, RecordDict

    from clients.client_app import make_client_app, train_batch
    from clients.node import LOCAL_ADAPTER, ClientNode
    from fedlowrank.adapters import select_roles
    from fedlowrank.protocol import TrainInstruction
    from fedlowrank.protocol import flower as wire
    from simulations.grids import adopt_server_identity
    from strategies.strategy import build_strategy

    adopt_server_identity()  # messages read the task identity a Flower runtime would have set
    config = tiny_config(strategy="fedsa", engine="batched")
    strategy = build_strategy(config, workspace.initial_state)
    content = wire.encode_instruction(TrainInstruction(2, strategy.spec, strategy.global_state, config.seed))

    def federation() -> tuple[list[Message], list[Context]]:
        contexts = [
            Context(run_id=1, node_id=k, node_config={"partition-id": k}, state=RecordDict(), run_config={})
            for k in range(3)
        ]
        kept = select_roles(workspace.initial_state, *strategy.spec.kept_roles())
        broken = {key: torch.full_like(value, float("nan")) for key, value in kept.items()}
        ClientNode(contexts[1], config, 1, 0).save_state(LOCAL_ADAPTER, broken)
        return [Message(content, dst_node_id=k, message_type="train") for k in range(3)], contexts

    messages, contexts = federation()
    batched = train_batch(messages, contexts, config)
    assert batched[1].has_error() and "ClientDivergedError" in batched[1].error.reason
    assert "diverged" in batched[1].error.reason
    app = make_client_app(bound_config=config)
    messages, contexts = federation()
    for k in (0, 2):
        alone = wire.decode_train_reply(app(messages[k], contexts[k]).content)
        together = wire.decode_train_reply(batched[k].content)
        assert together.partition_id == alone.partition_id == k and together.num_examples == alone.num_examples
        for key, value in alone.state.items():
            # float32 sums in another order, through AdamW's normalised steps: ~7e-5 at most, healthy or not
            assert (together.state[key] - value).norm() <= 5e-4 * value.norm(), key
