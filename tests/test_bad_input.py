"""Bad input ends in one clear paragraph (exit code 2) before anything trains, and leaves nothing half-written;
runs never overwrite each other unless asked; a diverging client fails, it is not averaged in."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedlowrank.cli import app

runner = CliRunner()
TINY = [
    "num-clients=3", "num-rounds=1", "data.max-train-examples=90", "data.max-test-examples=24",
    "data.max-length=32", "data.min-partition-size=3", "train.local-steps=1", "train.batch-size=8",
]  # fmt: skip


def _simulate(tmp_path, *sets: str, data_dir=None, name: str = "run", extra: tuple[str, ...] = ()):
    args = ["simulate", "--name", name, *extra]
    for pair in (*TINY, f"output-dir={tmp_path / 'runs'}", *sets):
        args += ["--set", pair]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return runner.invoke(app, args)


def _write(folder, train: str | bytes, test: str | bytes = "text,label\nwhat is x ?,A\nwho is y ?,B\n"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.csv", train), ("test.csv", test)):
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


def _rows(n: int, blank_text: tuple[int, ...] = (), blank_label: tuple[int, ...] = ()) -> str:
    lines = ["text,label"]
    for i in range(n):
        text = "" if i in blank_text else f"question number {i} about things"
        label = "" if i in blank_label else "AB"[i % 2]
        lines.append(f"{text},{label}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("empty", "is empty"),
        ("header-only", "train split has no rows"),
        ("latin1", "not UTF-8"),
        ("blank-text", "train rows 3, 7 have no text in column 'text'"),
        ("blank-label", "train rows 2 have no label in column 'label'"),
        ("test-only-label", "appear only in the test split (test rows 2)"),
    ],
)
def test_bad_datasets_are_refused_with_the_rows_to_fix(case, fragment, tmp_path):
    data = tmp_path / "data" / "bad"
    contents = {
        "empty": "",
        "header-only": "text,label\n",
        "latin1": ("text,label\n" + "caf\xe9 cr\xe8me question,A\n" * 40).encode("latin-1"),
        "blank-text": _rows(40, blank_text=(2, 6)),
        "blank-label": _rows(40, blank_label=(1,)),
    }
    test = "text,label\nwhat is x ?,A\nwho is y ?,C\n" if case == "test-only-label" else None
    _write(data, contents.get(case, _rows(40)), *([test] if test else []))
    result = _simulate(tmp_path, "dataset=bad", data_dir=tmp_path / "data")
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_a_test_only_label_can_be_kept_and_is_reported(tmp_path):
    _write(tmp_path / "data" / "odd", _rows(60), "text,label\nwhat is x ?,A\nwho is y ?,C\nwhy z ?,B\n")
    result = _simulate(tmp_path, "dataset=odd", "data.unseen-test-labels=keep", data_dir=tmp_path / "data")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["unseen_test_labels"] == ["C"]


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (("data.max-length=1000",), "exceeds the 512 positions"),
        (("train.eval-batch-size=0",), "train.eval-batch-size must be >= 1"),
        (("train.lr=inf",), "train.lr must be a finite number"),
        (("train.lr=nan",), "train.lr must be a finite number"),
    ],
)
def test_bad_settings_are_refused_before_training(sets, fragment, tmp_path, data_dir):
    result = _simulate(tmp_path, *sets, data_dir=data_dir)
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()


def test_an_output_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path, data_dir, monkeypatch):
    import fedlowrank.runtime

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(fedlowrank.runtime, "build_workspace", no_loading)
    (tmp_path / "runs").write_text("not a folder")
    result = _simulate(tmp_path, data_dir=data_dir)
    assert result.exit_code == 2 and "is a file" in result.output


def test_runs_are_not_overwritten_unless_asked(tmp_path, data_dir):
    first = _simulate(tmp_path, data_dir=data_dir)
    assert first.exit_code == 0, first.output
    adapter = tmp_path / "runs" / "run" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    key = (tmp_path / "runs" / "run" / "run-key").read_text()  # the run's folder in its nodes' client state
    again = _simulate(tmp_path, data_dir=data_dir)
    assert again.exit_code == 2 and "already holds a finished run" in " ".join(again.output.split())
    assert adapter.read_bytes() == before  # untouched
    finished = runner.invoke(app, ["simulate", "--resume", str(tmp_path / "runs" / "run")])
    assert finished.exit_code == 0, finished.output  # resuming a finished run trains nothing, replaces nothing
    assert adapter.read_bytes() == before
    assert (tmp_path / "runs" / "run" / "run-key").read_text() == key  # a resumed run keeps its clients' state
    replaced = _simulate(tmp_path, "seed=1", data_dir=data_dir, extra=("--overwrite",))
    assert replaced.exit_code == 0, replaced.output
    assert adapter.read_bytes() != before
    assert (tmp_path / "runs" / "run" / "run-key").read_text() not in ("", key)  # a new run: no client state yet
    assert len((tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    (tmp_path / "runs" / "run" / "run-key").write_text("../another-run")  # damaged: never used as a path
    damaged = runner.invoke(app, ["simulate", "--resume", str(tmp_path / "runs" / "run")])
    assert damaged.exit_code == 2 and "is damaged" in " ".join(damaged.output.split()), damaged.output


def test_validation_fraction_zero_works(tmp_path, data_dir):
    result = _simulate(tmp_path, "data.validation-fraction=0.0", "strategy=fedsa", data_dir=data_dir)
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "client_eval_accuracy" not in row  # no client validated anything: nothing is averaged
    assert row["test_clients_scored"] == 3 and 0 <= row["test_accuracy"] <= 1


def test_a_diverging_client_fails_and_nothing_non_finite_is_saved(tmp_path, data_dir):
    result = _simulate(tmp_path, "train.lr=1e30", "optimizer=sgd", "train.local-steps=3", data_dir=data_dir)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "no client returned a result" in text and "diverged" in text and "--resume" in text
    assert not (tmp_path / "runs" / "run" / "adapter").exists()
