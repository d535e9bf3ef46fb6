"""Cohort nodes: virtual clients hosted by a few nodes and trained there together (``clients/cohort.py``,
``strategies/cohorts.py``) end where one node per client ends, keep their state where they live, and refuse
nodes that do not match the run's cohorts.

A tiny Llama-style decoder (no dropout, so the batched engine and the one-client-at-a-time path draw nothing
different) on a deterministic addition task keeps these runs to seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlowrank.config import RunConfig
from fedlowrank.report import read_metrics
from fedlowrank.tiny_models import save_tiny_decoder, write_addition_task


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def addition(tmp_path_factory):
    return write_addition_task(tmp_path_factory.mktemp("addition"), train=480, test=24)


def cohort_settings(model: Path, dataset: Path, output: Path, name: str, **overrides) -> dict:
    flat = {
        "task": "causal-lm", "model": str(model), "dataset": str(dataset), "name": name,
        "output-dir": str(output), "num-clients": 16, "num-rounds": 2, "seed": 3,
        "fraction-train": 0.5, "fraction-evaluate": 0.25, "server-eval-every": 100,
        "data.partitioner": "iid", "data.max-length": 40, "data.min-partition-size": 1,
        "train.batch-size": 8, "train.local-steps": 2, "train.lr": 3e-3,
        "train.max-new-tokens": 4, "train.generate-examples": 4,
        "lora.r": 4, "lora.alpha": 8.0, "device": "cpu",
    }  # fmt: skip
    flat.update(overrides)
    return flat


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_federation(ours: Path, reference: Path, private: bool) -> None:
    """The same ε ledger and losses round by round (checked first: a round that trained other clients shows
    there by name), and the same global adapter (to float rounding)."""
    rows, reference_rows = read_metrics(ours), read_metrics(reference)
    assert [r["round"] for r in rows] == [r["round"] for r in reference_rows]
    for row, reference_row in zip(rows, reference_rows, strict=True):
        assert row["clients_accepted"] == reference_row["clients_accepted"]
        assert row["train_loss"] == pytest.approx(reference_row["train_loss"], rel=1e-4)
        assert row["bytes_up_per_client"] == reference_row["bytes_up_per_client"]  # bytes per virtual client
        assert row["bytes_down"] == reference_row["bytes_down"]
        if private:  # the same ledger; another process's accountant may differ in the last bits (~1e-15)
            ledger, reference_ledger = row["dp_epsilon_per_client"], reference_row["dp_epsilon_per_client"]
            assert ledger.keys() == reference_ledger.keys()
            assert all(ledger[c] == pytest.approx(reference_ledger[c], rel=1e-12) for c in ledger)
    want, got = _adapter(reference), _adapter(ours)
    assert set(got) == set(want)
    for key, value in want.items():
        # AdamW's first step (g/|g|) turns float rounding in near-zero gradients into ±lr flips (test_engine.py)
        assert (got[key] - value).norm() <= 1e-3 * value.norm() + 1e-6, key


CASES = {
    "fedit": {"strategy": "fedit"},
    "fedsa-waves": {"strategy": "fedsa", "engine-wave-size": 3},  # each client's own B waits in its node's state
    "ffa-dp": {"strategy": "ffa", "dp.epsilon": 8.0, "dp.max-grad-norm": 0.5},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_cohort_nodes_run_the_federation_of_one_node_per_client(llama, addition, tmp_path, case):
    from simulations.run import run_inprocess

    runs = {}
    for name, nodes in (("per-client", 0), ("cohorts", 2)):
        flat = cohort_settings(llama, addition, tmp_path / "runs", name, **CASES[case], **{"cohort-nodes": nodes})
        run_inprocess(RunConfig.from_flat(flat))
        runs[name] = tmp_path / "runs" / name
    assert_same_federation(runs["cohorts"], runs["per-client"], private="dp.epsilon" in CASES[case])
    rows = read_metrics(runs["cohorts"])
    assert all(set(row["cohort_node_seconds"]) == {"0", "1"} for row in rows)  # which node took how long
    if "dp.epsilon" in CASES[case]:
        assert 0 < max(rows[-1]["dp_epsilon_per_client"].values()) <= 8.0


def test_runs_sharing_a_nodes_state_folder_never_read_each_others_client_state(llama, addition, tmp_path):
    """A node's state folder outlives runs: run B on the folder run A used must end where B ends on a folder of
    its own (FedSA under DP-SGD, half the clients a round, other seeds: some of B's round-2 clients trained in
    A's round 1 and not in B's). Each run's clients keep their files under its run key (a resumed run keeps
    its key: ``test_bad_input.py``; and finds its clients' state: ``test_resume.py``)."""
    from simulations.run import run_inprocess

    shared = {"client-state": "disk", "client-state-dir": str(tmp_path / "node-state")}
    case = {"strategy": "fedsa", "dp.epsilon": 8.0, "dp.max-grad-norm": 0.5, "fraction-evaluate": 0.0}
    runs = tmp_path / "runs"
    run_inprocess(RunConfig.from_flat(cohort_settings(llama, addition, runs, "a", **case, **shared, seed=5)))
    run_inprocess(RunConfig.from_flat(cohort_settings(llama, addition, runs, "b", **case, **shared)))
    run_inprocess(RunConfig.from_flat(cohort_settings(llama, addition, runs, "b-alone", **case)))
    assert_same_federation(runs / "b", runs / "b-alone", private=True)
    keys = {(runs / name / "run-key").read_text() for name in ("a", "b")}
    assert {p.name for p in (tmp_path / "node-state").iterdir()} == keys  # one folder per run, named by its key


LOST_STATE_CASES = {  # the three ways a round's clients train: cohort nodes, one node per client, one wave
    "fedsa-dp-cohort-nodes": {"strategy": "fedsa", "cohort-nodes": 2},
    "fedit-dp-one-node-per-client": {"strategy": "fedit"},  # only the accountant is kept
    "fedsa-dp-batched": {"strategy": "fedsa", "engine": "batched"},
    "fedsa-dp-checkpoint-from-before-the-record": {"strategy": "fedsa", "cohort-nodes": 2},  # the ledger names them
}


@pytest.mark.parametrize("case", sorted(LOST_STATE_CASES))
def test_a_client_whose_node_lost_its_state_fails_rather_than_start_its_accountant_over(
    llama, addition, tmp_path, case
):
    """Under DP-SGD, after round 1 the nodes' state folder is wiped (a node restarted on an empty disk) and the
    run resumed: in round 2 each client that trained in round 1 fails and says why, its ε stays what the
    ledger recorded (never under-reported), and the clients new to the run train."""
    import shutil

    from fedlowrank.checkpoint import load_checkpoint, save_checkpoint
    from simulations.run import run_inprocess

    private = {"dp.epsilon": 8.0, "dp.max-grad-norm": 0.5, "fraction-evaluate": 0.0, "num-rounds": 1}
    runs = tmp_path / "runs"
    settings = cohort_settings(llama, addition, runs, "wiped", **private, **LOST_STATE_CASES[case])
    run_inprocess(RunConfig.from_flat(settings))
    shutil.rmtree(runs / "wiped" / "client-state")
    if case.endswith("from-before-the-record"):  # a checkpoint written before the server kept who trained
        tensors, meta = load_checkpoint(runs / "wiped")
        del meta["trained"]
        save_checkpoint(runs / "wiped", tensors, meta)
    run_inprocess(RunConfig.from_flat({**settings, "num-rounds": 2, "resume": True}))
    first, second = read_metrics(runs / "wiped")
    before, reasons = first["dp_epsilon_per_client"], second.get("clients_failed_reasons", {})
    assert reasons and all(
        why.startswith("ClientStateLost") and "lost its client state" in why for why in reasons.values()
    )
    assert second["clients_accepted"] == 8 - len(reasons) > 0  # the sampled clients new to the run trained
    assert {c: second["dp_epsilon_per_client"][c] for c in before} == before  # nobody's ε went down
    if "cohort-nodes" in LOST_STATE_CASES[case]:  # there the failures are named by client
        assert {int(node.removeprefix("node-")) for node in reasons} <= set(map(int, before))


def _grid(config: RunConfig, nodes: int, node_config: dict | None = None):
    from clients.client_app import make_client_app
    from simulations.grids import InProcessGrid, adopt_server_identity
    from strategies.cohorts import CohortGrid

    adopt_server_identity()
    inner = InProcessGrid(make_client_app(config), nodes, config.to_flat(), node_config=node_config)
    return CohortGrid(inner, config.num_clients, config.cohort_nodes)


def test_virtual_clients_live_on_node_k_mod_n_and_mismatched_nodes_are_refused(llama, addition, tmp_path):
    from strategies.cohorts import CohortError

    config = RunConfig.from_flat(cohort_settings(llama, addition, tmp_path, "x", **{"cohort-nodes": 3}))
    grid = _grid(config, 3)
    assert list(grid.get_node_ids()) == list(range(16))
    hosts = {cohort: node for cohort, node in grid.node_of.items()}
    assert sorted(hosts) == [0, 1, 2] and len(set(hosts.values())) == 3

    with pytest.raises(CohortError, match=r"of num-cohorts=4, but the run has cohort-nodes=3"):
        _grid(config, 4).get_node_ids()  # four nodes started for a run of three cohorts
    with pytest.raises(CohortError, match="both host cohort 0"):
        _grid(config, 2, {"cohort-id": 0, "num-cohorts": 3}).get_node_ids()
    with pytest.raises(CohortError, match="names no cohort-id and num-cohorts"):
        grid = _grid(config, 1)
        grid.grid.contexts[grid.grid.node_ids[0]].node_config.clear()  # a node started without any
        grid.get_node_ids()


# ---- real processes -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cohort_nodes_under_flowers_simulation_engine_match_one_node_per_client(llama, addition, tmp_path):
    """What `flwr run . --federation-config "num-supernodes=2"` starts: two nodes of Flower's simulation engine
    (Ray), one CPU each, host 16 virtual clients (FFA under DP-SGD) and end where the in-process run with one
    node per client ends."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from simulations.run import run_inprocess
    from strategies.server_app import make_server_app

    case = {**CASES["ffa-dp"], "fraction-evaluate": 0.0, "node-wait-seconds": 300}  # Ray starts slowly
    engine = RunConfig.from_flat(cohort_settings(llama, addition, tmp_path, "engine", **case, **{"cohort-nodes": 2}))
    run_simulation(
        server_app=make_server_app(engine),
        client_app=make_client_app(engine),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    run_inprocess(RunConfig.from_flat(cohort_settings(llama, addition, tmp_path, "per-client", **case)))
    assert_same_federation(tmp_path / "engine", tmp_path / "per-client", private=True)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def _run_config(settings: dict) -> str:
    """``flwr run --run-config`` text (TOML values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def assert_state_on_its_nodes(federation: Path, run_dir: Path) -> None:
    """Each of the two nodes' state folders holds only the run's folder (named by its run key), with the
    clients that node hosts: client k on node k mod 2."""
    key = (run_dir / "run-key").read_text()
    for cohort in (0, 1):
        node_state = federation / f"state-{cohort}"
        assert [p.name for p in node_state.iterdir()] == [key]
        clients = {int(p.name) for p in (node_state / key).iterdir()}
        assert clients and all(client % 2 == cohort for client in clients), clients


@pytest.mark.slow
def test_cohort_supernodes_match_the_in_process_run_and_keep_state_across_a_restart(llama, addition, tmp_path):
    """A real SuperLink and two cohort SuperNodes host 16 virtual clients (FedSA, each client's own B, under
    DP-SGD, each client's accountant). After round 1 the run is stopped (in round 2: a SuperNode starts a new
    ClientApp process for every message, tens of seconds here) and node 1 is killed and started again on its
    state folder; the run is resumed for round 2 and ends where the in-process run with one node per client
    ends, with the same ε ledger: the restarted node's clients carried on from their state on its disk."""
    from localfed import LocalFederation

    from simulations.run import run_inprocess

    case = {"strategy": "fedsa", "dp.epsilon": 8.0, "dp.max-grad-norm": 0.5, "fraction-evaluate": 0.0}
    runs = tmp_path / "runs"
    settings = cohort_settings(llama, addition, runs, "deployed", **case, **{"num-rounds": 2, "cohort-nodes": 2})
    # Node 0 answers the resumed run only after it has finished the stopped run's round-2 message (a SuperNode
    # handles one message at a time): on a slow machine that can take a minute. A round that went on without a
    # cohort would sample other clients and end elsewhere, so each round waits for both (asserted below).
    settings["node-wait-seconds"] = 300
    federation = LocalFederation(tmp_path / "federation", addition, secure=False)
    try:
        federation.start_superlink()
        for cohort in (0, 1):
            federation.start_supernode(cohort, 2)  # partition-id K of num-partitions 2: cohort K of 2
        _wait(lambda: federation.online_nodes() == 2, 60, "two nodes online")
        federation.submit(_run_config(settings))
        metrics = runs / "deployed" / "metrics.jsonl"
        _wait(lambda: metrics.is_file() and len(read_metrics(metrics.parent)) >= 1, 420, "round 1 finishing")
        federation.stop_runs()  # in round 2: the resumed run starts from round 1's checkpoint (asserted below)
        _wait(lambda: all(s.startswith("finished") for s in federation.statuses()), 60, "the run stopping")
        federation.kill("supernode-1")
        federation.start_supernode(1, 2)  # the same cohort, on the same state folder
        federation.submit(_run_config({**settings, "resume": True}), name="flwr-run-resumed")  # both logs kept
        _wait(lambda: "finished:completed" in federation.statuses(), 420, "the resumed run finishing")
        server_log = federation.log("flwr-run-resumed")
        assert "after round 1" in server_log  # round 2 ran after the restart
        for log in ("flwr-run", "flwr-run-resumed"):  # every round had both cohorts
            assert "going on with them" not in federation.log(log)
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.stop()
    reference = cohort_settings(llama, addition, runs, "per-client", **case, **{"num-rounds": 2})
    run_inprocess(RunConfig.from_flat(reference))
    assert_same_federation(runs / "deployed", runs / "per-client", private=True)
    assert len(read_metrics(runs / "deployed")) == 2
    # each client's accountant and own B on its node's disk, in the folder the resumed run kept
    assert_state_on_its_nodes(tmp_path / "federation", runs / "deployed")


@pytest.mark.slow
def test_cohort_supernodes_run_fedit_and_ffa_under_dp_as_one_node_per_client(llama, addition, tmp_path):
    """FedIT and FFA under DP-SGD on a real SuperLink with two cohort SuperNodes (FedSA under DP-SGD: the
    restart test above), as two runs at once on the same nodes (each node takes one message at a time, from
    either run): FedIT (no client state; its clients also scored on the nodes) and FFA (each client's
    accountant on its node, in its run's folder, across rounds) each end where their in-process run with one
    node per client ends, with the same ε ledger."""
    from localfed import LocalFederation

    from simulations.run import run_inprocess

    runs = tmp_path / "runs"
    # a ClientApp process per message, ~15 s each here: FedIT one round (train, then evaluate), FFA two rounds
    cases = {"fedit": {**CASES["fedit"], "num-rounds": 1}, "ffa-dp": {**CASES["ffa-dp"], "fraction-evaluate": 0.0}}
    federation = LocalFederation(tmp_path / "federation", addition, secure=False)
    try:
        federation.start_superlink()
        for cohort in (0, 1):
            federation.start_supernode(cohort, 2)
        _wait(lambda: federation.online_nodes() == 2, 60, "two nodes online")
        for case, overrides in cases.items():
            deployed = {"cohort-nodes": 2, "node-wait-seconds": 300}  # a node may be busy with the other run
            settings = cohort_settings(llama, addition, runs, f"deployed-{case}", **overrides, **deployed)
            federation.submit(_run_config(settings), name=f"flwr-run-{case}")
        _wait(lambda: len(federation.statuses()) == 2, 60, "both runs submitted")
        _wait(lambda: all(s.startswith("finished") for s in federation.statuses()), 600, "both runs finishing")
        listed = federation.runs()
        assert [run["status"] for run in listed] == ["finished:completed"] * 2, listed
        assert max(run["running-at"] for run in listed) < min(run["finished-at"] for run in listed)  # at once
        for case in cases:
            server_log = federation.log(f"flwr-run-{case}")
            assert "ServerApp finished running" in server_log  # the log followed the run to its end
            assert "going on with them" not in server_log  # and every round had both cohorts
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.stop()
    for case, overrides in cases.items():
        run_inprocess(RunConfig.from_flat(cohort_settings(llama, addition, runs, f"per-client-{case}", **overrides)))
        private = "dp.epsilon" in overrides
        assert_same_federation(runs / f"deployed-{case}", runs / f"per-client-{case}", private=private)
    evaluated, reference = read_metrics(runs / "deployed-fedit"), read_metrics(runs / "per-client-fedit")
    for score in ("client_eval_loss", "client_eval_accuracy"):  # the nodes' clients scored as one node per client
        assert [row[score] for row in evaluated] == pytest.approx([row[score] for row in reference], rel=1e-4)
    # FFA's accountants on their clients' nodes; FedIT keeps nothing there
    assert_state_on_its_nodes(tmp_path / "federation", runs / "deployed-ffa-dp")
