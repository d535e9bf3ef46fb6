"""Real Flower processes on localhost: a SuperLink, two SuperNodes and `flwr run` of this app (insecure)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlowrank.report import read_metrics

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_superlink_and_two_supernodes_run_two_rounds(tmp_path, data_dir):
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FEDLOWRANK_DATA=str(data_dir),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    link_port = _free_port()
    Path(env["FLWR_HOME"]).mkdir()
    Path(env["FLWR_HOME"], "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n'
        f'[superlink.local-deployment]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        )

    try:
        start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--database",
            str(tmp_path / "state.db"),
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
        )
        _wait_for_port(link_port)
        for pid in range(2):
            start(
                f"supernode{pid}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--node-config",
                f"partition-id={pid} num-partitions=2",
                "--host",
                "127.0.0.1",
                "--port",
                str(_free_port()),
            )
        run_config = (
            f"num-clients=2 num-rounds=2 name='deployed' output-dir='{tmp_path / 'runs'}' data-dir='{data_dir}' "
            "data.max-train-examples=200 data.max-test-examples=64 data.max-length=32 train.local-steps=3 "
            "train.batch-size=16"
        )
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "local-deployment", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink for the run's status.
        listing = subprocess.run(
            [str(BIN / "flwr"), "list", "local-deployment", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        runs = json.loads(listing.stdout)["runs"]
        assert len(runs) == 1
        assert runs[0]["status"] == "finished:completed", runs[0]
        rows = read_metrics(tmp_path / "runs" / "deployed")
        assert [row["round"] for row in rows] == [1, 2]
        assert all(row["clients_trained"] == 2 and row["test_accuracy"] is not None for row in rows)
        assert (tmp_path / "runs" / "deployed" / "adapter" / "adapter_model.safetensors").is_file()
    except BaseException:
        for log in sorted(logs.iterdir()):
            print(f"==== {log.name}\n{log.read_text()[-3000:]}")
        raise
    finally:
        _stop(processes)
