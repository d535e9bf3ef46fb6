"""Real Flower processes on localhost: a SuperLink, SuperNodes and `flwr run` of this app.

- TLS with a development CA (``fedlowrank deploy certs``) and SuperNode authentication: registered nodes train a
  round; a node whose key is not registered is refused; a node that does not trust the CA cannot connect.
- Failures: of three SuperNodes one is killed in the middle of a round and another between rounds; the run
  completes, the failures are recorded with their reasons, nothing hangs, and after every finished round its
  adapter is on disk (and readable) at every moment.
"""

from __future__ import annotations

import time

import pytest
from localfed import LocalFederation
from safetensors.torch import load_file

from fedlowrank.report import read_metrics

TINY = (
    "data.max-train-examples=180 data.max-test-examples=32 data.max-length=32 train.local-steps=2 "
    "train.batch-size=16 fraction-evaluate=0.0"
)


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


@pytest.mark.slow
def test_tls_and_supernode_authentication(tmp_path, data_dir):
    federation = LocalFederation(tmp_path, data_dir, secure=True, nodes=3)
    try:
        federation.start_superlink()
        keys = federation.files.node_keys
        for key in keys[:2]:
            federation.register(key)
        for pid in range(2):
            federation.start_supernode(pid, 2, key=keys[pid])
        stranger = federation.start_supernode(5, 2, key=keys[2])  # a key nobody registered
        untrusting = federation.start_supernode(6, 2, key=keys[0], trust_ca=False)  # no CA certificate
        assert stranger.wait(timeout=120) != 0 and untrusting.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in federation.log("supernode-5")
        assert "CERTIFICATE_VERIFY_FAILED" in federation.log("supernode-6")
        _wait(lambda: federation.online_nodes() == 2, 60, "two registered nodes online")

        runs = tmp_path / "runs"
        federation.submit(f"num-clients=2 num-rounds=1 name='tls' output-dir='{runs}' data-dir='{data_dir}' {TINY}")
        _wait(lambda: (federation.statuses() or [""])[0].startswith("finished"), 300, "the run finishing", poll=2)
        assert federation.statuses() == ["finished:completed"]
        rows = read_metrics(runs / "tls")
        assert rows[0]["clients_accepted"] == 2 and rows[0]["test_accuracy"] is not None
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.stop()


@pytest.mark.slow
def test_killed_supernodes_do_not_stop_or_hang_the_run(tmp_path, data_dir):
    federation = LocalFederation(tmp_path, data_dir, secure=False)
    runs = tmp_path / "runs" / "survivor"
    try:
        federation.start_superlink()
        for pid in range(3):
            federation.start_supernode(pid, 3)
        _wait(lambda: federation.online_nodes() == 3, 60, "three nodes online")
        run_config = (
            f"num-clients=3 num-rounds=2 name='survivor' output-dir='{runs.parent}' data-dir='{data_dir}' {TINY} "
            "node-wait-seconds=5 server.min-available=1 server.train-timeout=40"
        )
        federation.submit(run_config)
        # node 2 dies while it trains round 1 ...
        _wait(lambda: "Receiving: train message" in federation.log("supernode-2"), 180, "node 2 receiving round 1")
        federation.kill("supernode-2")
        # ... and node 1 between rounds 1 and 2
        _wait(lambda: (runs / "metrics.jsonl").is_file(), 240, "round 1 finishing")
        federation.kill("supernode-1")
        adapters_seen = 0
        while not (federation.statuses() or [""])[0].startswith("finished"):
            adapter = runs / "adapter" / "adapter_model.safetensors"
            if adapter.is_file():  # whenever it is there, it is a complete adapter
                assert load_file(str(adapter))
                adapters_seen += 1
            time.sleep(1)
        assert federation.statuses() == ["finished:completed"] and adapters_seen > 0
        rows = read_metrics(runs)
        assert [row["round"] for row in rows] == [1, 2]
        assert rows[0]["clients_failed"] >= 1 and rows[1]["clients_failed"] >= 1
        reasons = [why for row in rows for why in row["clients_failed_reasons"].values()]
        assert all(reasons) and rows[1]["clients_accepted"] >= 1
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.stop()
