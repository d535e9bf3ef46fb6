"""Adding a method is one file: a method module outside the package (``tests/plugins/fedavgm_b.py``) runs by
name through ``fedlowrank simulate``, shows its options in ``fedlowrank keys``, and has them checked; nothing
else was edited for it. Subprocesses, as a user runs it (and the registry of this test process stays clean)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "fedavgm_b.py"
TINY = [
    "num-clients=3", "num-rounds=2", "data.max-train-examples=240", "data.max-test-examples=64",
    "data.max-length=32", "data.min-partition-size=5", "train.local-steps=3", "train.batch-size=16",
]  # fmt: skip


def _fedlowrank(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedlowrank.cli", *args]
    env = dict(os.environ, FEDLOWRANK_DATA=str(data_dir), COLUMNS="200")
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _sets(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


def test_a_method_from_its_own_file_lists_checks_and_runs(tmp_path, data_dir):
    plugin = f"method-modules={PLUGIN}"
    keys = _fedlowrank("keys", *_sets(plugin), data_dir=data_dir)
    assert keys.returncode == 0, keys.stderr
    assert "method.fedavgm-b.momentum = 0.9" in keys.stdout and "server momentum" in keys.stdout

    bad = _fedlowrank(
        "simulate", *_sets(plugin, "strategy=fedavgm-b", "method.fedavgm-b.momentum=1.5"), data_dir=data_dir
    )
    assert bad.returncode == 2 and "method.fedavgm-b.momentum must be < 1" in " ".join(bad.stdout.split())
    typo = _fedlowrank(
        "simulate", *_sets(plugin, "strategy=fedavgm-b", "method.fedavgm-b.momentun=0.5"), data_dir=data_dir
    )
    assert typo.returncode == 2 and "Did you mean method.fedavgm-b.momentum" in " ".join(typo.stdout.split())

    # β = 0, η = 1 is FedIT: the same federation, the same adapter
    runs = {}
    for name, method in (
        ("toy", ["strategy=fedavgm-b", "method.fedavgm-b.momentum=0.0"]),
        ("fedit", ["strategy=fedit"]),
    ):
        out = tmp_path / name
        result = _fedlowrank(
            "simulate", *_sets(plugin, *method, *TINY, f"output-dir={out}"), "--name", name, data_dir=data_dir
        )
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = load_file(str(out / name / "adapter" / "adapter_model.safetensors"))
        assert f'strategy = "{method[0].split("=")[1]}"' in (out / name / "config.toml").read_text()
    for key, want in runs["fedit"].items():
        torch.testing.assert_close(runs["toy"][key], want, rtol=1e-6, atol=1e-7)
