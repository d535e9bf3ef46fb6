"""A process-wide workspace: the model with adapters, tokenizer (or image processor), task data and client
partitions.

Loaded once per process (a Flower simulation actor, a SuperNode's ClientApp process, the ServerApp, or
the in-process simulator) and reused for every round; only adapter tensors change between calls.
"""

from __future__ import annotations

import atexit
import copy
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from transformers import ImageProcessingMixin, PreTrainedTokenizerBase

from fedlowrank.adapters import (
    adapter_state,
    attach_lora,
    base_weights,
    load_adapter_state,
    resolve_targets,
    set_base_residuals,
    split_residuals,
    write_marks,
)
from fedlowrank.config import ConfigError, RunConfig
from fedlowrank.data import (
    ClientPartitions,
    ClientSplit,
    DataError,
    Loader,
    PaddedRows,
    TaskData,
    load_task,
    make_collator,
    make_loader,
    padding_is_right,
    partition,
    prepare_images,
    tokenize,
)
from fedlowrank.instructions import exact_match, perplexity, response_scores, tokenize_instructions
from fedlowrank.models import MemoryOptions, load_model, load_preprocessor, pick_device
from fedlowrank.training import EvalResult, evaluate


def load_run_task(config: RunConfig) -> TaskData:
    """The run's task data (train and global test splits), as every process of the run loads it."""
    return load_task(config.dataset, config.resolved_data_dir(), config.data, seed=config.seed, task=config.task)


TRAIN_ROW = "fedlowrank-train-row"  # an example's row in the task's training set


def client_partitions(config: RunConfig, task: TaskData) -> ClientPartitions:
    """Each client's train and validation share under ``config`` (deterministic in the seed). Every example
    carries its row in the training set (``TRAIN_ROW``): a client's model-ready examples are cut from the
    training set prepared once (``Workspace``)."""
    rows = task.train.add_column(TRAIN_ROW, list(range(len(task.train))))
    return partition(rows, config.data, config.num_clients, config.seed)


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
    _padded: dict[tuple[str, int], PaddedRows | None] = field(default_factory=dict)
    _loaded: tuple[dict[str, torch.Tensor], tuple[tuple[int, int], ...]] | None = None  # see load_global
    _snapshot: tuple[tuple[tuple[int, int], ...], dict[str, torch.Tensor]] | None = None  # see adapter_snapshot
    # causal-lm: the last exact-match evaluation's first few (prompt, generated, reference) triples
    generated_samples: list[dict[str, str]] = field(default_factory=list)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        """Set the model to the initial adapter overwritten by ``state`` (adapter keys and residuals).

        Nothing is written when the model still holds exactly this ``state``: the same object was loaded last
        and no tensor it wrote has been written since (their in-place write counters are unchanged), as when
        a round's clients are prepared one after another for the batched engine (two full adapter copies per
        client otherwise)."""
        if self._loaded is not None and self._loaded[0] is state and self._loaded[1] == self._write_marks():
            return
        adapter, residuals = split_residuals(state)
        load_adapter_state(self.model, self.initial_state)
        load_adapter_state(self.model, adapter, strict=False)
        set_base_residuals(self.model, self.base_weights, residuals)
        marks = self._write_marks()
        self._loaded = (state, marks) if marks is not None else None  # holding ``state`` keeps its id unique

    def _write_marks(self) -> tuple[tuple[int, int], ...] | None:
        return write_marks(self.model, self.base_weights)

    def adapter_snapshot(self) -> dict[str, torch.Tensor]:
        """``adapter_state`` of the model, one copy shared for as long as the adapter is unchanged (write marks):
        a round's clients that start from the same broadcast share it. Read-only: copy before writing."""
        marks = self._write_marks()
        if marks is None:  # writes cannot be told apart: a fresh copy every time
            return adapter_state(self.model)
        if self._snapshot is None or self._snapshot[0] != marks:
            self._snapshot = (marks, adapter_state(self.model))
        return self._snapshot[1]

    @cached_property
    def client_splits(self) -> ClientPartitions:
        return client_partitions(self.config, self.task)

    def client_split(self, partition_id: int) -> ClientSplit:
        if not 0 <= partition_id < self.config.num_clients:
            raise DataError(f"partition-id {partition_id} is outside 0..{self.config.num_clients - 1}")
        return self.client_splits[partition_id]

    def _tokenized_split(self, name: str, index: int, dataset: Dataset) -> Dataset:
        """Model-ready examples of a split: tokenized text, or images turned into pixel values on access."""
        key = (name, index)
        if key not in self._tokenized and name in ("train", "validation") and not self.task.is_image:
            # a client's examples, cut from the training set tokenized once: tokenizing each client's few
            # examples on its own cost ~25 ms a client (datasets' map), most of a round of first-time clients
            whole = self._tokenized_split("train-all", 0, self.task.train)
            self._tokenized[key] = whole.select(dataset[TRAIN_ROW])
        if key not in self._tokenized and self.task.is_image:
            self._tokenized[key] = prepare_images(
                dataset, self.tokenizer, self.task.image_column, self.task.label_column
            )
        if key not in self._tokenized and self.task.is_instruction:
            self._tokenized[key] = tokenize_instructions(
                dataset, self.tokenizer, self.task.instruction_format, self.config.data.max_length
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

    def client_train_loader(self, partition_id: int, seed: int) -> Loader:
        source = self.client_split(partition_id).train
        return self._loader(("train", partition_id), source, self.config.train.batch_size, shuffle=True, seed=seed)

    def _loader(self, split: tuple[str, int], source: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> Loader:
        """A loader of a split prepared from ``source``; text splits are collated once and kept (``PaddedRows``)."""
        data = self._tokenized_split(*split, source)
        rows = self._padded_rows(split, data, source)
        return make_loader(data, self.tokenizer, batch_size, shuffle, seed, self.task.is_instruction, rows=rows)

    def _padded_rows(self, split: tuple[str, int], data: Dataset, source: Dataset) -> PaddedRows | None:
        """``data`` (the split's model-ready rows, prepared from ``source``) collated once and kept, where the
        collator pads on the right. A client's split cut from the training set (``_tokenized_split``) is its
        rows of the training set collated once (``PaddedRows.subset``): the same batches, and a batched step
        gathers all its clients' rows from one tensor at once."""
        if split not in self._padded:
            rows = None
            if padding_is_right(self.tokenizer, self.task.is_instruction):
                whole = None
                if split[0] in ("train", "validation") and not self.task.is_image and len(source):
                    everything = self._tokenized_split("train-all", 0, self.task.train)
                    whole = self._padded_rows(("train-all", 0), everything, self.task.train)
                # a split cut from the training set carries its rows there (``TRAIN_ROW``, ``_tokenized_split``)
                rows = whole.subset(source[TRAIN_ROW]) if whole is not None else PaddedRows.build(data, self.collator)
            self._padded[split] = rows
        return self._padded[split]

    def client_train_examples(self, partition_id: int) -> tuple[TorchDataset, Callable[[list], dict[str, Tensor]]]:
        """This client's training examples and the collate function that batches them, for trainers that draw
        their own batches by index (DP-SGD's Poisson batches): the split collated once (``PaddedRows``, whose
        items are indices and whose batches are gathers: ~0.04 ms instead of ~0.4 ms to read and pad a batch
        from Arrow), else the model-ready rows (``client_train_dataset``) and ``collator``."""
        split = ("train", partition_id)
        source = self.client_split(partition_id).train
        rows = self._padded_rows(split, self._tokenized_split(*split, source), source)
        if rows is not None:
            return rows, rows.batch
        return self.client_train_dataset(partition_id), self.collator

    def client_train_dataset(self, partition_id: int) -> Dataset:
        """This client's model-ready training examples (their count plans DP-SGD's σ; ``client_train_examples``
        batches them for trainers that draw their own batches)."""
        data = self._tokenized_split("train", partition_id, self.client_split(partition_id).train)
        if self.task.is_image or data.format["type"] is None:  # images keep their transform
            return data
        return data.with_format(None)

    @cached_property
    def collator(self):
        """Batches ``client_train_dataset`` rows: per-batch padding (text) or stacked pixel values (images)."""
        return make_collator(self.tokenizer, token_labels=self.task.is_instruction)

    def client_validation_loader(self, partition_id: int) -> Loader:
        source = self.client_split(partition_id).validation
        return self._loader(("validation", partition_id), source, self.config.train.eval_batch_size, shuffle=False)

    def train_loader(self, seed: int) -> Loader:
        """The whole training set (centralized training)."""
        return self._loader(("train-all", 0), self.task.train, self.config.train.batch_size, shuffle=True, seed=seed)

    def test_loader(self) -> Loader:
        return self._loader(("test", 0), self.task.test, self.config.train.eval_batch_size, shuffle=False)

    def generation_due(self, server_round: int, last_round: bool) -> bool:
        """causal-lm: whether this round's evaluation generates answers (exact match)."""
        every = self.config.train.generate_every
        return self.task.is_instruction and (last_round or (every > 0 and server_round % every == 0))

    def save_generated_samples(self, recorder: Any, server_round: int) -> None:
        """causal-lm: the last exact-match evaluation's first answers (prompt, generated, reference) to
        ``generations.json`` in the run folder, to read what the model says; nothing when none were generated."""
        if self.generated_samples:
            recorder.write_json("generations.json", {"round": server_round, "samples": self.generated_samples})
            self.generated_samples = []

    def score(self, split: str = "test", partition_id: int = 0, *, generate: bool = False) -> EvalResult:
        """The model as it is now on the global test split (``"test"``) or a client's validation split: a
        classifier's loss, accuracy and F1; a causal LM's response-token loss, token accuracy and perplexity,
        and with ``generate`` the exact match of its greedy answers (first ``train.generate-examples`` rows)."""
        if split == "test":
            loader, rows = self.test_loader(), self.task.test
        else:
            loader, rows = self.client_validation_loader(partition_id), self.client_split(partition_id).validation
        if not self.task.is_instruction:
            return evaluate(self.model, loader, self.task.num_labels)
        loss, accuracy, count = response_scores(self.model, loader)
        result = EvalResult(loss, accuracy, float("nan"), count, perplexity=perplexity(loss))
        if generate:
            settings = self.config.train
            if settings.generate_examples:
                rows = rows.select(range(min(settings.generate_examples, len(rows))))
            result.exact_match, self.generated_samples = exact_match(
                self.model,
                self.tokenizer,
                rows,
                self.task.instruction_format,
                max_length=self.config.data.max_length,
                max_new_tokens=settings.max_new_tokens,
                batch_size=settings.eval_batch_size,
            )
        return result


_LOADED: list[tuple[tuple, Workspace]] = []  # (key, workspace), at most one per process


def _workspace_key(config: RunConfig) -> tuple:
    """Settings that change what is loaded; rounds, learning rates etc. do not. Compared, not serialized:
    every message asks for its workspace (hundreds a round), and equal dataclass sections compare in ~1 µs
    where their reprs took ~15 µs. Stored keys are deep copies, so a section changed in place later is a
    change of key."""
    return (
        config.model,
        config.task,
        config.dataset,
        config.resolved_data_dir(),
        config.num_clients,
        config.seed,
        config.device,
        config.trust_remote_code,
        (config.base_dtype, config.quantize, config.gradient_checkpointing),
        config.lora,
        config.data,
    )


def get_workspace(config: RunConfig) -> Workspace:
    """The cached workspace for ``config``, loading it on first use in this process."""
    key = _workspace_key(config)
    if _LOADED and _LOADED[0][0] == key:
        workspace = _LOADED[0][1]
        workspace.config = config
        return workspace
    workspace = build_workspace(config)
    replaced = bool(_LOADED)
    _LOADED.clear()  # one model per process: a new configuration replaces the old one
    _LOADED.append((copy.deepcopy(key), workspace))
    _freeze_long_lived(collect_first=replaced)
    return workspace


def _freeze_long_lived(collect_first: bool) -> None:
    """Exempt what is loaded now from Python's cyclic garbage collector. A loaded model, tokenizer and data are
    ~600k objects that live as long as the process, and each full collection walked all of them (0.4 s on a
    2-core CPU, several times a round with hundreds of clients); frozen, a round's collections see only what the
    round allocates (512 tiny clients: 3.8-4.3 s rounds against 4.5-5.4 s, back-to-back runs, not side by side).
    A replaced workspace's objects are unfrozen and collected first; everything is unfrozen at exit (extensions
    that check for leaks at shutdown expect it).

    The young generation is collected every ``YOUNG_GC_THRESHOLD`` allocations instead of every 700: a round of
    512 tiny clients allocates ~45k containers (messages, records, state dicts), and at 700 the collector ran ~70
    times a round, 15-45 ms of a 1.2 s round on a 2-core CPU, against ~5 ms at 20,000 (same process, alternating)."""
    if collect_first:
        gc.unfreeze()
        gc.collect()
    gc.freeze()
    young, *older = gc.get_threshold()
    if 0 < young < YOUNG_GC_THRESHOLD:  # 0: the collector is off; leave it so
        gc.set_threshold(YOUNG_GC_THRESHOLD, *older)


YOUNG_GC_THRESHOLD = 20_000


atexit.register(gc.unfreeze)  # see _freeze_long_lived


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
    generated = config.train.max_new_tokens if config.task == "causal-lm" else 0
    if generated and positions and config.data.max_length + generated > positions:
        raise ConfigError(
            f"a prompt of up to data.max-length={config.data.max_length} tokens plus train.max-new-tokens="
            f"{generated} generated ones exceeds the {positions} positions model {config.model!r} has: make their "
            f"sum <= {positions}"
        )


def build_workspace(config: RunConfig) -> Workspace:
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
        memory=MemoryOptions(config.base_dtype, config.quantize, config.gradient_checkpointing),
    )
    _check_max_length(model, config)
    peft_model = attach_lora(model, resolve_targets(model, config.lora, config.task), config.task)
    # fields in order: config, model, tokenizer, task, device, initial_state, base_weights
    return Workspace(config, peft_model, tokenizer, task, device, adapter_state(peft_model), base_weights(peft_model))
