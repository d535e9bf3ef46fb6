"""Federated runs end to end: the in-process grid and Flower's own Ray simulation, same apps."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from fedlowrank.data import make_loader, tokenize
from fedlowrank.models import load_model
from fedlowrank.report import read_metrics
from fedlowrank.training import evaluate


def _check_run_dir(run_dir, rounds):
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == list(range(1, rounds + 1))
    for row in rows:
        for key in (
            "train_loss",
            "test_loss",
            "test_accuracy",
            "test_f1",
            "bytes_down",
            "bytes_up",
            "wall_time",
            "client_eval_accuracy",
        ):
            assert row[key] is not None, key
        assert row["bytes_down"] > 0 and row["bytes_up"] > 0
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "plots" / "curves.png").stat().st_size > 10_000
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    return rows


def test_two_round_inprocess_simulation_writes_a_loadable_adapter(tiny_config):
    from simulations.run import run_inprocess

    config = tiny_config(**{"train.local-steps": 6})
    summary = run_inprocess(config)
    run_dir = config_run_dir(config)
    rows = _check_run_dir(run_dir, 2)
    # every client uploads exactly what it downloaded: all trainable adapter tensors, fp32
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"]
    assert rows[0]["clients_trained"] == 3 and rows[0]["clients_failed"] == 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # The saved adapter loads with plain peft and reproduces the reported test accuracy.
    saved = json.loads((run_dir / "summary.json").read_text())
    model = load_model("minilm", num_labels=6, label_names=saved["label_names"])
    reloaded = PeftModel.from_pretrained(model, run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")  # saved beside the adapter
    from fedlowrank.runtime import get_workspace

    test = get_workspace(config).task.test
    loader = make_loader(tokenize(test, tokenizer, "text", "label", config.data.max_length), tokenizer, 64, False)
    result = evaluate(reloaded, loader, 6)
    assert result.accuracy == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(summary["test_loss"], rel=1e-5)


def config_run_dir(config):
    from pathlib import Path

    return Path(config.output_dir) / config.name


@pytest.mark.slow
def test_two_round_flower_ray_simulation_matches_inprocess(tiny_config):
    """The same ServerApp and ClientApp under Flower's Ray simulation engine give the same global adapter."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.run import run_inprocess
    from strategies.server_app import make_server_app

    ray_config = tiny_config(name="ray")
    run_simulation(
        server_app=make_server_app(ray_config),
        client_app=make_client_app(ray_config),
        num_supernodes=ray_config.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    ray_rows = _check_run_dir(config_run_dir(ray_config), 2)
    local_config = tiny_config(name="local")
    run_inprocess(local_config)
    local_rows = read_metrics(config_run_dir(local_config))
    # Same seeds, same partitions, deterministic CPU training: identical curves up to float noise.
    for ray_row, local_row in zip(ray_rows, local_rows, strict=True):
        assert ray_row["train_loss"] == pytest.approx(local_row["train_loss"], rel=1e-4)
        assert ray_row["test_accuracy"] == pytest.approx(local_row["test_accuracy"], abs=0.011)
        assert ray_row["bytes_up"] == local_row["bytes_up"]
    ray_adapter = _adapter_tensors(config_run_dir(ray_config))
    local_adapter = _adapter_tensors(config_run_dir(local_config))
    for key in ray_adapter:
        torch.testing.assert_close(ray_adapter[key], local_adapter[key], rtol=1e-3, atol=1e-4)


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_server_stops_clearly_when_too_few_nodes_connect(tiny_config):
    from clients.client_app import make_client_app
    from simulations.grids import InProcessGrid
    from strategies.server_app import FederationError, run_server

    config = tiny_config(**{"num-clients": 3, "node-wait-seconds": 0.5, "server.min-available": 3})
    grid = InProcessGrid(make_client_app(config), num_nodes=2, run_config=config.to_flat())
    with pytest.raises(FederationError, match="only 2 node.*min-available=3.*num-supernodes=3.*--resume"):
        run_server(grid, config)


def test_too_few_clients_of_cohort_nodes_are_explained_per_cohort(tiny_config):
    """With cohort nodes the grid lists virtual clients: the advice is one SuperNode per cohort, not per partition."""
    from clients.client_app import make_client_app
    from simulations.grids import InProcessGrid
    from strategies.server_app import FederationError
    from strategies.strategy import Sampling

    config = tiny_config(**{"num-clients": 4, "cohort-nodes": 2, "node-wait-seconds": 0.2, "server.min-available": 3})
    grid = InProcessGrid(make_client_app(config), num_nodes=2, run_config=config.to_flat())
    sampling = Sampling.from_config(config)
    advice = r"only 2 client\(s\).*num-supernodes=2.*cohort-id=K num-cohorts=2.*K = 0\.\.1"
    with pytest.raises(FederationError, match=advice):
        sampling.wait_for_nodes(grid, poll_seconds=0.05)


def test_the_server_goes_on_with_the_nodes_it_has(tiny_config):
    """After node-wait-seconds a round goes on with the connected nodes (at least server.min-available)."""
    from clients.client_app import make_client_app
    from fedlowrank.report import read_metrics
    from simulations.grids import InProcessGrid, adopt_server_identity
    from strategies.server_app import run_server

    adopt_server_identity()
    config = tiny_config(**{"num-clients": 3, "node-wait-seconds": 0.2, "num-rounds": 1, "name": "two-of-three"})
    grid = InProcessGrid(make_client_app(config), 2, config.to_flat(), node_config={"num-partitions": 3})
    run_server(grid, config)
    assert read_metrics(f"{config.output_dir}/two-of-three")[0]["clients_accepted"] == 2


def test_registered_nodes_get_a_context_only_when_first_addressed():
    """10,000 registered virtual nodes cost a dictionary entry each; a node's Context (with its state) is made
    when it first gets a message and is the same object afterwards."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from simulations.grids import InProcessGrid

    seen = []
    app = ClientApp()

    @app.train()
    def train(message, context):
        seen.append(context.node_config["partition-id"])
        context.state["visits"] = ConfigRecord({"n": 1})
        return Message(RecordDict(), reply_to=message)

    grid = InProcessGrid(app, num_nodes=10_000, run_config={"lr": 0.1}, seed=1)
    nodes = list(grid.get_node_ids())
    assert len(nodes) == len(set(nodes)) == 10_000 and len(grid.contexts) == 10_000
    assert grid.contexts._made == {}
    chosen = [nodes[7], nodes[9_999]]
    grid.send_and_receive([grid.create_message(RecordDict(), "train", n, "1") for n in chosen])
    assert sorted(grid.contexts._made) == sorted(chosen) and seen == [7, 9_999]
    context = grid.contexts[nodes[7]]
    assert context.node_config["num-partitions"] == 10_000 and context.run_config == {"lr": 0.1}
    assert "visits" in context.state and grid.contexts[nodes[7]] is context
    with pytest.raises(ValueError, match="unknown destination"):
        grid.push_messages([grid.create_message(RecordDict(), "train", 12345, "1")])


def test_a_workspace_cuts_each_clients_examples_from_the_training_set_tokenized_once(tiny_config):
    """Cut by row from the training set tokenized once, a client's examples are exactly its own split tokenized
    on its own; the loaded workspace is exempt from the garbage collector, and a replaced one is collected."""
    import gc
    import weakref

    from fedlowrank.data import tokenize
    from fedlowrank.runtime import get_workspace

    config = tiny_config()
    workspace = get_workspace(config)
    assert gc.get_freeze_count() > 0
    for pid in range(config.num_clients):
        split = workspace.client_split(pid)
        for name, rows in (("train", split.train), ("validation", split.validation)):
            alone = tokenize(rows, workspace.tokenizer, "text", "label", config.data.max_length)
            cut = workspace._tokenized_split(name, pid, rows)
            assert len(cut) == len(rows) and cut.to_dict() == alone.to_dict()
    assert get_workspace(config) is workspace and get_workspace(tiny_config()) is workspace  # equal settings
    assert get_workspace(tiny_config(**{"num-rounds": 7})) is workspace  # what is loaded does not depend on it
    old_model = weakref.ref(workspace.model)
    del workspace, split, rows, alone, cut
    config.lora.r = 2  # changed in place: another adapter, so a new workspace replaces the old one
    replacing = get_workspace(config)
    gc.collect()
    assert old_model() is None and replacing.config.lora.r == 2
    assert get_workspace(config) is replacing


def test_loading_the_same_broadcast_again_writes_nothing_until_the_adapter_is_written(tiny_config):
    """``load_global`` skips a state the model already holds (same object, no write since); any in-place write
    (a training step here) makes the next load restore it. ``adapter_snapshot`` is shared until a write."""
    import torch

    from fedlowrank.adapters import adapter_state
    from fedlowrank.runtime import get_workspace

    workspace = get_workspace(tiny_config())
    broadcast = {k: v + 0.5 for k, v in workspace.initial_state.items()}
    workspace.load_global(broadcast)
    first = workspace.adapter_snapshot()
    assert all(torch.equal(first[k], broadcast[k]) for k in broadcast)
    live = [p for p in workspace.model.parameters() if p.requires_grad]
    versions = [p._version for p in live]
    workspace.load_global(broadcast)
    assert [p._version for p in live] == versions  # nothing written
    assert workspace.adapter_snapshot() is first
    with torch.no_grad():
        live[0].add_(1.0)  # what an optimizer step does
    assert workspace.adapter_snapshot() is not first
    workspace.load_global(broadcast)
    assert all(torch.equal(adapter_state(workspace.model)[k], broadcast[k]) for k in broadcast)
    workspace.load_global({k: v.clone() for k, v in broadcast.items()})  # another object: loaded again
    assert [p._version for p in live] != versions
    snapshot = workspace.adapter_snapshot()
    owner, name = next((m, n) for m in workspace.model.modules() for n, p in m._parameters.items() if p is live[0])
    setattr(owner, name, torch.nn.Parameter(live[0].detach().clone()))  # replaced, not written: a new tensor
    assert workspace.adapter_snapshot() is not snapshot
    setattr(owner, name, live[0])
    snapshot = workspace.adapter_snapshot()
    base = next(iter(workspace.base_weights))
    with torch.no_grad():
        workspace.model.get_submodule(base).base_layer.weight.mul_(1.0)  # a frozen weight written (FedEx's fold)
    assert workspace.adapter_snapshot() is not snapshot
    workspace.load_global(workspace.initial_state)


def test_replies_are_collected_as_they_arrive_and_a_timeout_returns_what_came(tiny_config):
    """``send_and_collect`` polls until every message has its reply, however few a poll brings; with a
    timeout it returns what has come by then."""
    import time

    from flwr.app import Message, RecordDict

    from clients.client_app import make_client_app
    from simulations.grids import InProcessGrid, adopt_server_identity
    from strategies.replies import send_and_collect

    class Trickling(InProcessGrid):  # one reply per poll
        polls = 0

        def pull_messages(self, message_ids):
            self.polls += 1
            return super().pull_messages([m for m in message_ids if m in self._pending][:1])

    class Silent(InProcessGrid):  # a node that never answers
        def pull_messages(self, message_ids):
            return []

    config = tiny_config()
    adopt_server_identity()
    for kind in (Trickling, Silent):
        grid = kind(make_client_app(config), num_nodes=3, run_config=config.to_flat())
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query.cohort") for n in grid.node_ids]
        started = time.monotonic()
        replies = send_and_collect(grid, messages, timeout=None if kind is Trickling else 0.3)
        if kind is Trickling:
            assert len(replies) == 3 and grid.polls == 3
            assert sorted(r.metadata.src_node_id for r in replies) == sorted(grid.node_ids)
        else:
            assert replies == [] and 0.3 <= time.monotonic() - started < 5


def test_reply_polls_are_late_by_a_bounded_fraction_of_the_wait():
    """A reply is collected at most 5 % of the time waited after it came (10 ms at first, 1 s at most): a poll
    interval that only grows had a 0.55 s round collected at 0.75 s."""
    from strategies.replies import FIRST_POLL, LATE_FRACTION, LONGEST_POLL, poll_interval

    assert poll_interval(0.0) == FIRST_POLL
    for waited in (0.5, 0.55, 2.0, 10.0):
        assert poll_interval(waited) <= max(FIRST_POLL, LATE_FRACTION * waited) + 1e-12
    assert poll_interval(3600.0) == LONGEST_POLL
    # polls over a 60 s wait: dozens, not thousands
    waited, polls = 0.0, 0
    while waited < 60.0:
        waited += poll_interval(waited)
        polls += 1
    assert polls < 200
