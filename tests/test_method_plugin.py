"""Adding a method is one file: a method module outside the package (``tests/plugins/fedavgm_b.py``) runs by
name through ``fedlowrank simulate``, shows its options in ``fedlowrank keys``, and has them checked; nothing
else was edited for it. (The registry is restored afterwards, so other tests never see the plugin.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedlowrank.cli import app

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "plugins" / "fedavgm_b.py"
TINY = [
    "num-clients=3", "num-rounds=2", "data.max-train-examples=180", "data.max-test-examples=32",
    "data.max-length=32", "data.min-partition-size=5", "train.local-steps=2", "train.batch-size=16",
]  # fmt: skip
runner = CliRunner()


@pytest.fixture()
def registry_restored(monkeypatch):
    import strategies.registry as registry

    registry.method_names()  # built-ins loaded before the copy
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def _sets(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_a_method_from_its_own_file_lists_checks_and_runs(tmp_path, data_dir, registry_restored):
    plugin = f"method-modules={PLUGIN}"
    keys = runner.invoke(app, ["keys", *_sets(plugin)])
    assert keys.exit_code == 0, keys.output
    assert "method.fedavgm-b.momentum = 0.9" in _flat(keys.output) and "server momentum" in keys.output

    bad = runner.invoke(app, ["simulate", *_sets(plugin, "strategy=fedavgm-b", "method.fedavgm-b.momentum=1.5")])
    assert bad.exit_code == 2 and "method.fedavgm-b.momentum must be < 1" in _flat(bad.output)
    typo = runner.invoke(app, ["simulate", *_sets(plugin, "strategy=fedavgm-b", "method.fedavgm-b.momentun=0.5")])
    assert typo.exit_code == 2 and "Did you mean method.fedavgm-b.momentum" in _flat(typo.output)

    # β = 0, η = 1 is FedIT: the same federation, the same adapter
    runs = {}
    for name, method in (
        ("toy", ["strategy=fedavgm-b", "method.fedavgm-b.momentum=0.0"]),
        ("fedit", ["strategy=fedit"]),
    ):
        args = ["simulate", *_sets(plugin, *method, *TINY, f"output-dir={tmp_path}"), "--name", name]
        result = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
        assert result.exit_code == 0, result.output
        runs[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert f'strategy = "{method[0].split("=")[1]}"' in (tmp_path / name / "config.toml").read_text()
    for key, want in runs["fedit"].items():
        torch.testing.assert_close(runs["toy"][key], want, rtol=1e-6, atol=1e-7)
