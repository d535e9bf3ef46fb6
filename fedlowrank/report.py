"""Run output: ``runs/<name>/`` with the resolved config, ``metrics.jsonl``, plots and the final adapter."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fedlowrank.config import RunConfig


class RunRecorder:
    """Writes one run's files. Every report or sweep reads them back from disk."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.started = time.perf_counter()

    @classmethod
    def create(cls, config: RunConfig, overwrite: bool = True) -> RunRecorder:
        run_dir = Path(config.output_dir) / config.name
        run_dir.mkdir(parents=True, exist_ok=True)
        recorder = cls(run_dir)
        if overwrite and recorder.metrics_path.exists():
            recorder.metrics_path.unlink()
        (run_dir / "config.toml").write_text(config.to_toml())
        return recorder

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_jsonable(row)) + "\n")

    def save_adapter(self, model: Any, preprocessor: Any, base_residuals: dict[str, Any] | None = None) -> Path:
        """``adapter/``: a standard peft adapter folder with the tokenizer (or image processor), plus
        ``base_residuals.safetensors`` (W − W0 per layer) when the frozen weights changed too."""
        adapter_dir = self.run_dir / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        if base_residuals:
            from safetensors.torch import save_file

            save_file(base_residuals, str(adapter_dir / "base_residuals.safetensors"))
        model.save_pretrained(adapter_dir)
        preprocessor.save_pretrained(adapter_dir)
        return adapter_dir

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.run_dir / name
        path.write_text(json.dumps(_jsonable(payload), indent=2))
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED = (
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("test_accuracy", "test accuracy"),
    ("test_f1", "test macro-F1"),
    ("client_eval_accuracy", "client validation accuracy"),
)


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
