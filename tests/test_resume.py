"""Runs survive kill -9: a 4-round run killed between rounds, in the middle of a round (after a client saved its
next state) and while the checkpoint is written, then resumed, ends bit-identical to the uninterrupted run with
the same ε ledger. Real processes, as a user runs them (``FEDLOWRANK_TEST_CRASH_AT`` picks the kill point)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "num-clients=3", "num-rounds=4", "data.max-train-examples=120", "data.max-test-examples=24",
    "data.max-length=32", "data.min-partition-size=5", "train.local-steps=2", "train.batch-size=16",
    "optimizer=sgd", "train.lr=0.5",
]  # fmt: skip
METHODS = {
    "fedsa-dp": ["strategy=fedsa", "dp.epsilon=50", "dp.noise-multiplier=0.8"],
    "fedsvd": ["strategy=fedsvd"],
}
# kill points, in order: in the middle of round 2 (client 1 has trained and saved its next state, the server has
# not aggregated), while round 3's checkpoint is written (after its temporary file, before the rename), and
# between rounds 1 and 2
KILLS = {"fedsa-dp": ["trained-1-round-2", "writing:checkpoint-3"], "fedsvd": ["after-round-1"]}


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlowrank.cli", *args]


def _env(data_dir: Path, crash_at: str = "") -> dict[str, str]:
    env = dict(os.environ, FEDLOWRANK_DATA=str(data_dir))
    env.pop("FEDLOWRANK_TEST_CRASH_AT", None)
    if crash_at:
        env["FEDLOWRANK_TEST_CRASH_AT"] = crash_at
    return env


def _reference(output: Path, method: list[str], data_dir: Path) -> None:
    """The uninterrupted run, in this process (the same numbers as a fresh process: tested)."""
    from fedlowrank.config import RunConfig, parse_overrides
    from simulations.run import run_inprocess

    flat = {**parse_overrides([*TINY, *method]), "output-dir": str(output), "name": "reference"}
    run_inprocess(RunConfig.from_flat({**flat, "data-dir": str(data_dir)}))


def _killed_run(run_dir: Path, point: str, method: list[str], data_dir: Path, started: bool) -> None:
    """Start (or resume) the run and kill it at ``point``."""
    if started:
        args = _command("simulate", "--resume", str(run_dir))
    else:
        sets = [part for pair in [*TINY, *method, f"output-dir={run_dir.parent}"] for part in ("--set", pair)]
        args = _command("simulate", *sets, "--name", run_dir.name)
    done = subprocess.run(args, env=_env(data_dir, point), capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, f"not killed at {point}: {done.stdout[-1500:]}{done.stderr[-1500:]}"


@pytest.mark.parametrize("method", list(METHODS))
def test_a_killed_run_resumes_bit_identically(method, tmp_path, data_dir):
    _reference(tmp_path, METHODS[method], data_dir)
    run_dir = tmp_path / "interrupted"
    for index, point in enumerate(KILLS[method]):
        _killed_run(run_dir, point, METHODS[method], data_dir, started=index > 0)
        assert (run_dir / "config.toml").is_file()
    done = subprocess.run(
        _command("simulate", "--resume", str(run_dir)), env=_env(data_dir), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    reference, resumed = tmp_path / "reference", run_dir
    for name in ("adapter_model.safetensors",):
        want, got = load_file(str(reference / "adapter" / name)), load_file(str(resumed / "adapter" / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), "adapter differs"
    rows = {
        key: [json.loads(line) for line in (d / "metrics.jsonl").open()]
        for key, d in (("a", reference), ("b", resumed))
    }
    assert [r["round"] for r in rows["b"]] == [1, 2, 3, 4]  # every round once, none lost or repeated
    for field in ("train_loss", "test_loss", "dp_epsilon_per_client", "bytes_up", "bytes_down"):
        assert [r.get(field) for r in rows["a"]] == [r.get(field) for r in rows["b"]], field
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["stopped"] is None
