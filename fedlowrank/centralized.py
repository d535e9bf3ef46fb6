"""Centralized LoRA fine-tuning with the same library: the upper bound federated runs compare against.

One "round" is ``train.local-epochs`` (or ``train.local-steps``) over the whole training set, followed by
an evaluation on the test set, so ``metrics.jsonl`` lines up with a federated run round for round.
"""

from __future__ import annotations

import time
from typing import Any

from fedlowrank.adapters import count_parameters
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.diagnostics import learning_warning
from fedlowrank.galore_setup import check_galore_on_lora_factors, lora_base_weights, set_base_trainable
from fedlowrank.progress import Reporter
from fedlowrank.report import RunRecorder, check_run_dir, plot_run, read_metrics, summary_scores
from fedlowrank.runtime import get_workspace
from fedlowrank.training import train_local


def train_centralized(config: RunConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    reporter = reporter or Reporter()
    if config.resume:
        raise ConfigError("centralized training cannot resume: rerun it (with --overwrite to replace the old run)")
    check_galore_on_lora_factors(config)
    check_run_dir(config)  # before the model loads
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
        generate = workspace.generation_due(epoch, epoch == config.num_rounds)
        row.update(workspace.score("test", generate=generate).as_dict("test_"))
        workspace.save_generated_samples(recorder, epoch)
        row.update({"round_time": time.perf_counter() - started, "wall_time": recorder.elapsed()})
        recorder.log(row)
        reporter.round_finished(row)
    residuals = _base_residuals(workspace, config.galore.train_modules) if trained_layers else {}
    set_base_trainable(workspace.model, config.galore.train_modules, False)
    adapter_dir = recorder.save_adapter(workspace.model, workspace.tokenizer, residuals)
    final = read_metrics(recorder.run_dir)[-1]
    summary = {
        "run_dir": str(recorder.run_dir),
        **summary_scores(final),
        "wall_time": recorder.elapsed(),
        "unseen_test_labels": workspace.task.unseen_test_labels or None,
        "learning_warning": learning_warning(final, config.train.lr),
        "plot": str(plot_run(recorder.run_dir)),
        "adapter": str(adapter_dir),
    }
    recorder.write_json("summary.json", summary)
    if summary["learning_warning"]:
        reporter.note(summary["learning_warning"])
    reporter.finish(read_metrics(recorder.run_dir), summary)
    return summary


def _base_residuals(workspace: Any, modules: list[str]) -> dict[str, Any]:
    """The trained base weights as W − W0 per layer (the format FedEx/FLoRA runs save beside the adapter)."""
    return {
        layer: (weight.detach().float().cpu() - workspace.base_weights[layer].float().cpu()).contiguous()
        for layer, weight in lora_base_weights(workspace.model, modules).items()
    }
