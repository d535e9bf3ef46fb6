"""Run output: ``runs/<name>/`` with the resolved config, ``metrics.jsonl``, plots and the final adapter."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlowrank.checkpoint import write_atomic
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.factors import non_finite_keys
from fedlowrank.protocol.messages import check_run_key


class RunExistsError(ConfigError):
    """A run would write into a folder that already holds one (and was not asked to resume or replace it)."""


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.output_dir) / config.name


def check_run_dir(config: RunConfig) -> Path:
    """Before anything loads: the run folder can be written, and holds no other run unless ``resume`` (then it
    must hold one) or ``overwrite`` says what to do with it."""
    run_dir = run_dir_of(config)
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output path {parent} is a file, not a folder: choose another output-dir or --name")
    held = run_dir.is_dir() and any(run_dir.iterdir())
    if config.resume and not (run_dir / "config.toml").is_file():
        raise ConfigError(f"nothing to resume in {run_dir}: it holds no run (no config.toml)")
    if held and not (config.resume or config.overwrite):
        finished = (run_dir / "summary.json").is_file()
        state = "a finished run" if finished else "an unfinished run"
        raise RunExistsError(
            f"{run_dir} already holds {state}. Pass --resume to continue it from its last checkpoint, --overwrite "
            "to replace it (its metrics, adapter and client state are deleted), or --name for a new run."
        )
    return run_dir


RUN_KEY_FILE = "run-key"


class RunRecorder:
    """Writes one run's files. Every report or sweep reads them back from disk."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.started = time.perf_counter()
        self.run_key = _read_run_key(run_dir)

    @classmethod
    def create(cls, config: RunConfig, run_key: bool = False) -> RunRecorder:
        """A new run's folder (replacing an old run only with ``overwrite``), or, with ``resume``, the existing one.

        ``run_key`` (federated runs): a new run gets its run key, the folder of its clients' state on their nodes;
        a resumed one keeps its own, so it finds that state again, and no other run ever reads it."""
        run_dir = check_run_dir(config)
        if config.overwrite and run_dir.is_dir():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            if run_key:  # before config.toml: a folder that can be resumed always has its key
                key = new_run_key(config.name)
                write_atomic(run_dir / RUN_KEY_FILE, lambda target: target.write_text(key))
            written = replace(config, overwrite=False)
            write_atomic(run_dir / "config.toml", lambda target: target.write_text(written.to_toml()))
        return cls(run_dir)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_jsonable(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def keep_rounds(self, last_round: int) -> None:
        """Drop metric rows of rounds after ``last_round`` (a round that ran past the checkpoint a resume starts
        from is run again and logged again)."""
        if not self.metrics_path.is_file():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line in kept if json.loads(line).get("round", 0) <= last_round]
        write_atomic(self.metrics_path, lambda target: target.write_text("".join(f"{line}\n" for line in kept)))

    def save_adapter(self, model: Any, preprocessor: Any, base_residuals: dict[str, Any] | None = None) -> Path:
        """``adapter/``: a standard peft adapter folder with the tokenizer (or image processor), plus
        ``base_residuals.safetensors`` (W − W0 per layer) when the frozen weights changed too. Written to a
        temporary folder, then moved in file by file (each move atomic): a crash leaves the previous adapter
        or the new one, and a non-finite model is never saved."""
        from safetensors.torch import save_file

        check_finite({k: v for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k})
        check_finite(base_residuals or {})
        adapter_dir = self.run_dir / "adapter"
        staging = self.run_dir / ".adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if base_residuals:
            save_file(base_residuals, str(staging / "base_residuals.safetensors"))
        model.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        adapter_dir.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir()):
            write_atomic(adapter_dir / path.name, lambda target, source=path: os.replace(source, target))
        shutil.rmtree(staging, ignore_errors=True)
        return adapter_dir

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.run_dir / name
        write_atomic(path, lambda target: target.write_text(json.dumps(_jsonable(payload), indent=2)))
        return path


class NonFiniteModelError(RuntimeError):
    """A model with NaN or infinite weights: never saved (a run keeps its last finite one)."""


def check_finite(tensors: dict[str, Any]) -> None:
    bad = non_finite_keys(tensors)
    if bad:
        raise NonFiniteModelError(f"{len(bad)} tensor(s) are not finite (e.g. {bad[0]}): refusing to save them")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _read_run_key(run_dir: Path) -> str:
    """The run's key; "" for a run made before run keys, whose clients keep their state in the folder itself."""
    path = run_dir / RUN_KEY_FILE
    if not path.is_file():
        return ""
    try:
        return check_run_key(path.read_text().strip())
    except ValueError as exc:
        raise ConfigError(f"{path} is damaged ({exc}): restore it, or start the run again with --overwrite") from exc


def new_run_key(name: str) -> str:
    """``<name>-<12 random hex digits>``: a user can tell whose folder it is on a node, and no two runs share one."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-")[:40]
    return f"{readable}-{uuid.uuid4().hex[:12]}" if readable else uuid.uuid4().hex[:12]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED = (
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("test_accuracy", "test accuracy"),
    ("test_f1", "test macro-F1"),
    ("test_exact_match", "test exact match"),
    ("client_eval_accuracy", "client validation accuracy"),
)
# The final test scores a run's summary carries (those its task has: a causal LM has no F1, a classifier no
# perplexity); accuracy is per token for a causal LM.
SUMMARY_SCORES = ("test_accuracy", "test_f1", "test_loss", "test_perplexity", "test_exact_match")


def summary_scores(final: dict[str, Any]) -> dict[str, Any]:
    """The final metrics row's test scores, for a summary: accuracy, F1 and loss always (None when absent)."""
    scores = {key: final.get(key) for key in SUMMARY_SCORES}
    return {key: value for key, value in scores.items() if value is not None or key in SUMMARY_SCORES[:3]}


def plot_run(run_dir: str | Path) -> Path:
    """Plot the per-round curves of a run into ``plots/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    present = [(key, label) for key, label in PLOTTED if any(row.get(key) is not None for row in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in present:
        points = [(row["round"], row[key]) for row in rows if row.get(key) is not None]
        axis = axes[0] if "loss" in key else axes[1]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for axis, title in zip(axes, ("loss", "accuracy / F1"), strict=True):
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "curves.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
