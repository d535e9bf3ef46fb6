"""A process-wide workspace: the model with adapters, tokenizer (or image processor), task data and client
partitions.

Loaded once per process (a Flower simulation actor, a SuperNode's ClientApp process, the ServerApp, or
the in-process simulator) and reused for every round; only adapter tensors change between calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import torch
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import ImageProcessingMixin, PreTrainedTokenizerBase

from fedlowrank.adapters import (
    adapter_state,
    attach_lora,
    base_weights,
    load_adapter_state,
    set_base_residuals,
    split_residuals,
)
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.data import (
    ClientSplit,
    DataError,
    TaskData,
    load_task,
    make_collator,
    make_loader,
    partition,
    prepare_images,
    tokenize,
)
from fedlowrank.models import load_model, load_preprocessor, pick_device

TRAINABLE_TASKS = ("seq-cls", "image-cls")


def load_run_task(config: RunConfig) -> TaskData:
    """The run's task data (train and global test splits), as every process of the run loads it."""
    return load_task(config.dataset, config.resolved_data_dir(), config.data, seed=config.seed, task=config.task)


def client_partitions(config: RunConfig, task: TaskData) -> list[ClientSplit]:
    """Each client's train and validation share under ``config`` (deterministic in the seed)."""
    return partition(task.train, config.data, config.num_clients, config.seed)


@dataclass
class Workspace:
    config: RunConfig
    model: PeftModel
    # What turns raw examples into model inputs: the tokenizer for text tasks, the image processor for
    # task = "image-cls" (the name stays: clients, servers and centralized training use it, e.g. to save
    # it beside the adapter with save_pretrained, which both have).
    tokenizer: PreTrainedTokenizerBase | ImageProcessingMixin
    task: TaskData
    device: torch.device
    # The adapter right after initialisation (seeded): the global starting point of a run.
    initial_state: dict[str, torch.Tensor]
    # The frozen weights under the LoRA layers, to restore before applying a folded residual.
    base_weights: dict[str, torch.Tensor]
    _tokenized: dict[tuple[str, int], Dataset] = field(default_factory=dict)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Set the model to the initial adapter overwritten by ``state`` (adapter keys and residuals)."""
        adapter, residuals = split_residuals(state)
        load_adapter_state(self.model, self.initial_state)
        load_adapter_state(self.model, adapter, strict=False)
        set_base_residuals(self.model, self.base_weights, residuals)

    @cached_property
    def client_splits(self) -> list[ClientSplit]:
        return client_partitions(self.config, self.task)

    def client_split(self, partition_id: int) -> ClientSplit:
        if not 0 <= partition_id < self.config.num_clients:
            raise DataError(f"partition-id {partition_id} is outside 0..{self.config.num_clients - 1}")
        return self.client_splits[partition_id]

    def _tokenized_split(self, name: str, index: int, dataset: Dataset) -> Dataset:
        """Model-ready examples of a split: tokenized text, or images turned into pixel values on access."""
        key = (name, index)
        if key not in self._tokenized and self.task.is_image:
            self._tokenized[key] = prepare_images(
                dataset, self.tokenizer, self.task.image_column, self.task.label_column
            )
        if key not in self._tokenized:
            self._tokenized[key] = tokenize(
                dataset,
                self.tokenizer,
                self.task.text_column,
                self.task.label_column,
                self.config.data.max_length,
                self.task.text_pair_column,
            )
        return self._tokenized[key]

    def client_train_loader(self, partition_id: int, seed: int) -> DataLoader:
        data = self._tokenized_split("train", partition_id, self.client_split(partition_id).train)
        return make_loader(data, self.tokenizer, self.config.train.batch_size, shuffle=True, seed=seed)

    def client_train_dataset(self, partition_id: int) -> Dataset:
        """This client's model-ready training examples (DP-SGD draws its own Poisson batches from them)."""
        data = self._tokenized_split("train", partition_id, self.client_split(partition_id).train)
        if self.task.is_image or data.format["type"] is None:  # images keep their transform
            return data
        return data.with_format(None)

    @cached_property
    def collator(self):
        """Batches ``client_train_dataset`` rows: per-batch padding (text) or stacked pixel values (images)."""
        return make_collator(self.tokenizer)

    def client_validation_loader(self, partition_id: int) -> DataLoader:
        data = self._tokenized_split("validation", partition_id, self.client_split(partition_id).validation)
        return make_loader(data, self.tokenizer, self.config.train.eval_batch_size, shuffle=False)

    def train_loader(self, seed: int) -> DataLoader:
        """The whole training set (centralized training)."""
        data = self._tokenized_split("train-all", 0, self.task.train)
        return make_loader(data, self.tokenizer, self.config.train.batch_size, shuffle=True, seed=seed)

    def test_loader(self) -> DataLoader:
        data = self._tokenized_split("test", 0, self.task.test)
        return make_loader(data, self.tokenizer, self.config.train.eval_batch_size, shuffle=False)


_WORKSPACES: dict[str, Workspace] = {}


def _workspace_key(config: RunConfig) -> str:
    """Settings that change what is loaded; rounds, learning rates etc. do not."""
    relevant = {
        "model": config.model,
        "task": config.task,
        "dataset": config.dataset,
        "data-dir": config.resolved_data_dir(),
        "num-clients": config.num_clients,
        "seed": config.seed,
        "device": config.device,
        "trust-remote-code": config.trust_remote_code,
        "lora": config.to_dict()["lora"],
        "data": config.to_dict()["data"],
    }
    return json.dumps(relevant, sort_keys=True)


def get_workspace(config: RunConfig) -> Workspace:
    """The cached workspace for ``config``, loading it on first use in this process."""
    key = _workspace_key(config)
    workspace = _WORKSPACES.get(key)
    if workspace is None:
        workspace = build_workspace(config)
        _WORKSPACES.clear()  # one model per process: a new configuration replaces the old one
        _WORKSPACES[key] = workspace
    else:
        workspace.config = config
    return workspace


def _check_max_length(model: torch.nn.Module, config: RunConfig) -> None:
    """Longer inputs than the model has positions for fail in the middle of training: refuse them up front."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions and "roberta" in str(getattr(model.config, "model_type", "")):
        positions -= 2  # RoBERTa's positions start after the padding index
    if config.task != "image-cls" and positions and config.data.max_length > positions:
        raise ConfigError(
            f"data.max-length={config.data.max_length} exceeds the {positions} positions model {config.model!r} "
            f"has: use data.max-length <= {positions}"
        )


def build_workspace(config: RunConfig) -> Workspace:
    if config.task not in TRAINABLE_TASKS:
        raise ConfigError(
            "training currently supports task='seq-cls' and task='image-cls'; causal-LM models load with "
            "fedlowrank.models.load_model(task='causal-lm') but have no training loop yet"
        )
    task = load_run_task(config)
    tokenizer = load_preprocessor(config.model, config.task, config.trust_remote_code)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)  # the new head and the adapter initialisation are functions of the seed
    model = load_model(
        config.model,
        config.task,
        task.num_labels,
        task.label_names,
        device=device,
        trust_remote_code=config.trust_remote_code,
    )
    _check_max_length(model, config)
    peft_model = attach_lora(model, config.lora, config.task)
    # fields in order: config, model, tokenizer, task, device, initial_state, base_weights
    return Workspace(config, peft_model, tokenizer, task, device, adapter_state(peft_model), base_weights(peft_model))
