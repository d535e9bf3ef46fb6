"""Real Flower processes on localhost: a SuperLink, SuperNodes and `flwr run` of this app, with TLS from a
development CA (``fedlowrank deploy certs``) and SuperNode authentication."""

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
def test_a_secure_deployment_refuses_strangers_and_survives_dying_nodes(tmp_path, data_dir):
    """One SuperLink with TLS and SuperNode authentication (one session keeps the test short):

    - a node whose key is not registered, and a node that does not trust the CA, are refused;
    - three registered nodes train; node 2 is killed while it trains round 1 and node 1 between rounds 1 and 2;
      the run completes, the failures are recorded with reasons, and whenever the adapter is on disk it is a
      complete one.
    """
    federation = LocalFederation(tmp_path, data_dir, secure=True, nodes=4)
    runs = tmp_path / "runs" / "survivor"
    try:
        federation.start_superlink()
        keys = federation.files.node_keys
        for key in keys[:3]:
            federation.register(key)
        stranger = federation.start_supernode(5, 3, key=keys[3])  # a key nobody registered
        untrusting = federation.start_supernode(6, 3, key=keys[0], trust_ca=False)  # no CA certificate
        for pid in range(3):
            federation.start_supernode(pid, 3, key=keys[pid])
        assert stranger.wait(timeout=120) != 0 and untrusting.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in federation.log("supernode-5")
        assert "CERTIFICATE_VERIFY_FAILED" in federation.log("supernode-6")
        _wait(lambda: federation.online_nodes() == 3, 60, "three registered nodes online")

        run_config = (
            f"num-clients=3 num-rounds=2 name='survivor' output-dir='{runs.parent}' data-dir='{data_dir}' {TINY} "
            "node-wait-seconds=5 server.min-available=1 server.train-timeout=40"
        )
        federation.submit(run_config)
        _wait(lambda: "Receiving: train message" in federation.log("supernode-2"), 180, "node 2 receiving round 1")
        federation.kill("supernode-2")  # in the middle of round 1
        _wait(lambda: (runs / "metrics.jsonl").is_file(), 240, "round 1 finishing")
        federation.kill("supernode-1")  # between rounds 1 and 2
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
        assert all(reasons) and rows[0]["clients_accepted"] >= 1 and rows[1]["clients_accepted"] >= 1
        assert rows[-1]["test_accuracy"] is not None
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.stop()
