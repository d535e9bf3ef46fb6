"""A run that has not learned says so, in its summary and on the console, with the likely fix."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fedlowrank.diagnostics import learning_warning
from fedlowrank.training import evaluate, label_entropy


def _row(**values):
    return {f"test_{key}": value for key, value in values.items()}


def test_warning_names_each_symptom_and_the_fix():
    healthy = _row(loss=0.6, accuracy=0.8, top_class_share=0.3, label_entropy=1.5)
    assert learning_warning(healthy, lr=5e-3) is None
    collapsed = learning_warning(_row(loss=1.2, accuracy=0.2, top_class_share=1.0, label_entropy=1.5), lr=5e-3)
    assert "100% of its test predictions are one class" in collapsed and "0.001" in collapsed
    assert "label entropy" not in collapsed  # its loss did move below H(y)
    flat = learning_warning(_row(loss=1.49, accuracy=0.4, top_class_share=0.5, label_entropy=1.5), lr=0.01)
    assert "no better than 1.500, the label entropy" in flat and "one class" not in flat and "more rounds" in flat
    assert learning_warning({"test_accuracy": 0.2}, lr=1.0) is None  # nothing to judge by
    assert learning_warning(_row(loss=0.0, accuracy=1.0, top_class_share=1.0, label_entropy=0.0), lr=1.0) is None
    private = learning_warning(_row(loss=1.49, accuracy=0.4, top_class_share=0.5, label_entropy=1.5), 4.0, "dp.lr")
    assert "dp.lr is 4" in private and "train.lr" not in private  # the rate the DP-SGD clients trained at


class _Constant(torch.nn.Module):
    """Predicts fixed logits for every input (its cross-entropy is known in closed form)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float64))

    def forward(self, labels, **_):
        logits = self.logits.expand(len(labels), -1)
        return type("Out", (), {"logits": logits, "loss": torch.nn.functional.cross_entropy(logits, labels)})


def test_evaluation_reports_prediction_share_and_label_entropy_in_float64():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    prior = torch.tensor([3, 1, 2], dtype=torch.float64) / 6
    result = evaluate(_Constant(prior.log().tolist()), [{"labels": labels[:4]}, {"labels": labels[4:]}], 3)
    want_entropy = -sum(p * math.log(p) for p in prior.tolist())
    assert result.label_entropy == pytest.approx(want_entropy, rel=1e-12)
    assert result.loss == pytest.approx(want_entropy, rel=1e-12)  # the prior's loss is exactly H(y)
    assert result.top_class_share == 1.0 and result.accuracy == pytest.approx(0.5)
    assert label_entropy(torch.tensor([5, 0, 0])) == 0.0
    assert "the model has not learned" in learning_warning(result.as_dict("test_"), lr=1e-3)


def test_a_collapsing_learning_rate_is_reported_by_centralized_and_federated_runs(tiny_config, tmp_path, data_dir):
    from fedlowrank.cli import app
    from simulations.run import run_inprocess

    sets = [
        "num-rounds=1", "train.lr=0.5", "data.max-train-examples=240", "data.max-test-examples=96",
        "data.max-length=32", f"output-dir={tmp_path}",
    ]  # fmt: skip
    args = ["train", "--data-dir", str(data_dir), "--name", "central", *[p for s in sets for p in ("--set", s)]]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "the model has not learned" in done.output and "try 0.1" in done.output
    assert "not learned" in json.loads((tmp_path / "central" / "summary.json").read_text())["learning_warning"]

    # FedSA scores personalised models: the clients' prediction shares reach the same check
    config = tiny_config(**{"strategy": "fedsa", "train.lr": 0.5, "num-rounds": 1, "train.local-steps": 4})
    summary = run_inprocess(config)
    assert summary["learning_warning"] and "train.lr is 0.5" in summary["learning_warning"]
