"""A real Flower federation on localhost for tests: a SuperLink, SuperNodes and ``flwr run`` of this app, as
separate processes (each in its own session, so that killing one kills what it spawned)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlowrank.deploy import DeploymentFiles, make_certificates

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


class LocalFederation:
    """``secure``: TLS with a development CA and SuperNode authentication (only registered keys may join);
    otherwise ``--insecure`` (local only)."""

    def __init__(self, root: Path, data_dir: Path, secure: bool, nodes: int = 2) -> None:
        self.root, self.data_dir, self.secure = root, data_dir, secure
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = dict(
            os.environ,
            FLWR_HOME=str(root / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env.pop("FEDLOWRANK_DATA", None)  # nodes get their data location from their own --node-config
        self.files: DeploymentFiles | None = make_certificates(root / "certs", nodes) if secure else None
        home = Path(self.env["FLWR_HOME"])
        home.mkdir()
        trust = f'root-certificates = "{self.files.ca_certificate}"' if self.files else "insecure = true"
        home.joinpath("config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"\n{trust}\n'
        )

    # ---- processes ---------------------------------------------------------------------------------------------
    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_superlink(self) -> None:
        tls = ["--insecure"]
        if self.files is not None:
            f = self.files
            tls = ["--ssl-ca-certfile", str(f.ca_certificate), "--ssl-certfile", str(f.server_certificate)]
            tls += ["--ssl-keyfile", str(f.server_key), "--enable-supernode-auth"]
        database = str(self.root / "state.db")
        host = ["--host", "127.0.0.1", "--port", str(self.port)]
        self.start(
            "superlink",
            "flower-superlink",
            *tls,
            "--disable-runtime-dependency-installation",
            "--database",
            database,
            *host,
        )
        wait_for_port(self.port)

    def register(self, key: Path) -> None:
        self.flwr("supernode", "register", f"{key}.pub", "local")

    def start_supernode(
        self, pid: int, num: int, *, key: Path | None = None, trust_ca: bool = True, extra: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """One SuperNode for partition ``pid`` with its own data location and state folder in its node config."""
        state_dir = self.root / f"state-{pid}"
        node_config = f"partition-id={pid} num-partitions={num} data-dir='{self.data_dir}' state-dir='{state_dir}'"
        args = ["flower-supernode", "--superlink", self.address, "--node-config", node_config]
        args += ["--host", "127.0.0.1", "--port", str(free_port()), "--max-retries", "3", "--max-wait-time", "20"]
        if self.files is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.files.ca_certificate)] if trust_ca else []
            args += ["--auth-supernode-private-key", str(key)] if key is not None else []
        return self.start(f"supernode-{pid}", *args, env=extra)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # ---- the flwr CLI ----------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def submit(self, run_config: str, name: str = "flwr-run") -> subprocess.Popen:
        """``flwr run`` of this app, following its logs under ``name`` (its exit code says nothing: see
        ``statuses``)."""
        return self.start(name, "flwr", "run", str(REPO), "local", "--stream", "--run-config", run_config)

    def runs(self) -> list[dict]:
        """``flwr list``: each run's id, status and times (ISO strings in UTC, "N/A" until reached)."""
        return json.loads(self.flwr("list", "local", "--format", "json").stdout)["runs"]

    def statuses(self) -> list[str]:
        return [run["status"] for run in self.runs()]

    def stop_runs(self) -> None:
        """``flwr stop`` every run that has not finished."""
        for run in self.runs():
            if not run["status"].startswith("finished"):
                self.flwr("stop", run["run-id"], "local")

    def online_nodes(self) -> int:
        listing = json.loads(self.flwr("supernode", "list", "local", "--format", "json").stdout)
        return sum(node.get("status") == "online" for node in listing["nodes"])

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def dump_logs(self) -> None:
        for log in sorted(self.logs.iterdir()):
            print(f"==== {log.name}\n{log.read_text(errors='replace')[-3000:]}")
