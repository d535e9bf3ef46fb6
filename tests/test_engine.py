"""The batched multi-client engine gives each client the update it would get training alone."""

from __future__ import annotations

import pytest
import torch

from fedlowrank.adapters import adapter_state, load_adapter_state, set_trainable
from fedlowrank.config import TrainSettings
from fedlowrank.engine import ClientJob, train_batched
from fedlowrank.runtime import get_workspace
from fedlowrank.training import train_local


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
        ClientJob(start, workspace.client_train_loader(pid, seed=5 + pid), 5 + pid) for pid, start in enumerate(starts)
    ]
    results = train_batched(workspace.model, jobs, settings, kind)
    sizes = [len(workspace.client_train_dataset(pid)) for pid in range(3)]
    for k, ((state, result), want) in enumerate(zip(results, expected, strict=True)):
        for key in want:
            moved = (want[key] - starts[k][key]).norm()
            error = (state[key] - want[key]).norm()
            assert error <= 1e-4 * max(float(moved), 1e-6) + 1e-7, (k, key, float(error), float(moved))
        assert result.dataset_size == sizes[k]
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


@pytest.mark.parametrize("strategy", ["fedit", "fedsa", "ffa"])
def test_batched_grid_runs_the_same_federation_as_the_sequential_path(workspace, tiny_config, strategy):
    """Same strategy code, same messages: the batched engine's run ends where the ClientApp-by-ClientApp run ends."""
    import json
    from pathlib import Path

    from strategies.simulation import run_inprocess

    finals, losses = {}, {}
    for engine in ("sequential", "batched"):
        config = tiny_config(**{"strategy": strategy, "engine": engine, "name": f"{strategy}-{engine}"})
        load_adapter_state(workspace.model, workspace.initial_state)
        run_inprocess(config)
        run_dir = Path(config.output_dir) / config.name
        finals[engine] = _final_adapter(run_dir)
        losses[engine] = [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").open()]
    for key, want in finals["sequential"].items():
        assert (finals["batched"][key] - want).norm() <= 1e-4 * want.norm() + 1e-6, key
    assert losses["batched"] == pytest.approx(losses["sequential"], rel=1e-4)
