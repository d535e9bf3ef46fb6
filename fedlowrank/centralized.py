"""Centralized LoRA fine-tuning with the same library: the upper bound federated runs compare against.

One "round" is ``train.local-epochs`` (or ``train.local-steps``) over the whole training set, followed by
an evaluation on the test set, so ``metrics.jsonl`` lines up with a federated run round for round.
"""

from __future__ import annotations

import time
from typing import Any

from fedlowrank.adapters import count_parameters
from fedlowrank.config import RunConfig
from fedlowrank.galore_setup import lora_base_weights, set_base_trainable
from fedlowrank.progress import Reporter
from fedlowrank.report import RunRecorder, plot_run, read_metrics
from fedlowrank.runtime import get_workspace
from fedlowrank.training import evaluate, train_local


def train_centralized(config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or Reporter()
    workspace = get_workspace(config)
    workspace.load_global({})  # start from the initial adapter and base weights, whatever ran before
    # galore.train-modules: these base weights train in full too (the optimizer decides how).
    trained_layers = set_base_trainable(workspace.model, config.galore.train_modules)
    recorder = RunRecorder.create(config)
    params = count_parameters(workspace.model)
    reporter.start(
        f"centralized | {config.model} on {config.dataset} | {len(workspace.task.train):,} examples | "
        f"{params.trainable:,} trainable params",
        config.num_rounds,
    )
    for epoch in range(1, config.num_rounds + 1):
        started = time.perf_counter()
        seed = config.seed * 1_000_003 + epoch
        reporter.round_started(epoch, 1)
        result = train_local(
            workspace.model,
            workspace.train_loader(seed),
            config.train,
            config.optimizer,
            seed=seed,
            galore=config.galore,
        )
        reporter.client_finished()
        row = {"round": epoch, "strategy": "centralized", "train_loss": result.loss}
        row.update(evaluate(workspace.model, workspace.test_loader(), workspace.task.num_labels).as_dict("test_"))
        row.update({"round_time": time.perf_counter() - started, "wall_time": recorder.elapsed()})
        recorder.log(row)
        reporter.round_finished(row)
    adapter_dir = recorder.run_dir / "adapter"
    if trained_layers:
        _save_base_residuals(workspace, config.galore.train_modules, adapter_dir)
        set_base_trainable(workspace.model, config.galore.train_modules, False)
    workspace.model.save_pretrained(adapter_dir)
    workspace.tokenizer.save_pretrained(adapter_dir)
    final = read_metrics(recorder.run_dir)[-1]
    summary = {
        "run_dir": str(recorder.run_dir),
        "test_accuracy": final["test_accuracy"],
        "test_f1": final["test_f1"],
        "test_loss": final["test_loss"],
        "wall_time": recorder.elapsed(),
        "plot": str(plot_run(recorder.run_dir)),
        "adapter": str(adapter_dir),
    }
    recorder.write_json("summary.json", summary)
    reporter.finish(read_metrics(recorder.run_dir), summary)
    return summary


def _save_base_residuals(workspace: Any, modules: list[str], adapter_dir: Any) -> None:
    """The trained base weights, as W − W0 per layer beside the adapter (the format FedEx/FLoRA runs use)."""
    from safetensors.torch import save_file

    residuals = {
        layer: (weight.detach().float().cpu() - workspace.base_weights[layer].float().cpu()).contiguous()
        for layer, weight in lora_base_weights(workspace.model, modules).items()
    }
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(residuals, str(adapter_dir / "base_residuals.safetensors"))
