"""Datasets: load by hub name or local files, partition across clients, tokenize with per-batch padding
(text) or turn images into ``pixel_values`` on the fly (images).

Local layout understood by name: ``<data-dir>/<name>/{train,test,validation}.{csv,json,jsonl,parquet}``
(image datasets: parquet with a datasets Image column, e.g. written by ``Dataset.to_parquet``, or files with
image paths), or an image folder ``<name>/{train,test}/<label>/<image files>`` (datasets' imagefolder;
a ``metadata.csv`` beside the images adds columns such as a domain).
A path to a folder with such files, or to a single file, works too; anything else is tried on the hub.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from datasets.utils import logging as datasets_logging
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    ShardPartitioner,
    SizePartitioner,
)
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import DataCollatorWithPadding, ImageProcessingMixin, PreTrainedTokenizerBase

from fedlowrank.config import DataSettings
from fedlowrank.errors import DataError  # noqa: F401  (raised here; defined light for the CLI)
from fedlowrank.hub import hub_reachable
from fedlowrank.instructions import InstructionCollator, InstructionFormat, detect_format

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TRAIN_SPLITS = ("train",)
TEST_SPLITS = ("test", "validation", "valid", "dev")


@dataclass
class TaskData:
    """A task's train and test splits: a classification task (text or images) with integer labels, or
    instruction data for a causal LM (``instruction_format`` set; no labels)."""

    train: Dataset
    test: Dataset
    label_names: list[str]
    text_column: str
    label_column: str
    text_pair_column: str = ""
    # Set for image classification (then the text columns are unused).
    image_column: str = ""
    # The column the "by-column" partitioner splits on (kept in the splits), if any.
    partition_column: str = ""
    # Labels of the test split that no training example has (kept only with data.unseen-test-labels = "keep").
    unseen_test_labels: list[str] = field(default_factory=list)
    # Set for task = "causal-lm": how a row becomes a prompt and a response.
    instruction_format: InstructionFormat | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_instruction(self) -> bool:
        return self.instruction_format is not None

    @property
    def is_image(self) -> bool:
        return bool(self.image_column)


# ---- loading --------------------------------------------------------------------------------------
def _local_split_files(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in FILE_FORMATS:
            split = path.stem
            if split in TRAIN_SPLITS or split in TEST_SPLITS:
                files.setdefault(split, str(path))
    return files


def _read_files(files: dict[str, str]) -> DatasetDict:
    formats = {FILE_FORMATS[Path(f).suffix] for f in files.values()}
    if len(formats) != 1:
        raise DataError(f"mixed file formats in one dataset: {sorted(files.values())}")
    for path in files.values():
        if Path(path).stat().st_size == 0:
            raise DataError(f"{path} is empty: a dataset file needs a header row and at least one example")
    try:
        with _quiet_progress():
            return load_dataset(formats.pop(), data_files=files)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{sorted(files.values())}: not UTF-8 text ({exc.reason} at byte {exc.start}). Save the files as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8 old.csv > new.csv)"
        ) from None
    except Exception as exc:  # pandas/arrow parse errors: one clear line, not a traceback
        empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(exc))
        if empty:
            where = files.get(empty[1], files)
            raise DataError(f"{where}: the {empty[1]} split has no rows (only a header?)") from None
        causes = [exc, exc.__cause__, exc.__context__]
        if any(isinstance(c, UnicodeDecodeError) for c in causes) or "utf-8" in str(exc).lower():
            raise DataError(f"{sorted(files.values())}: not UTF-8 text; save the files as UTF-8 ({exc})") from None
        raise DataError(f"could not read {sorted(files.values())}: {type(exc).__name__}: {exc}") from None


def _not_found(name: str, data_dir: str, reason: str) -> DataError:
    where = f"{data_dir}/{name}/" if data_dir else "<data-dir>/" + name + "/"
    return DataError(
        f"dataset {name!r} not found ({reason}). Offline, point at local files: put train.csv and test.csv "
        f"(or .json/.jsonl/.parquet) in {where} and pass --data-dir (or set FEDLOWRANK_DATA, or the "
        "'data-dir' config key), or pass the folder or file path itself as the dataset. "
        "Online, any Hugging Face hub dataset name works."
    )


def load_raw_dataset(name_or_path: str, data_dir: str = "", subset: str = "") -> DatasetDict:
    """Find and read a dataset: <data_dir>/<name>/, a folder, a file, or a hub name."""
    candidates = []
    if data_dir:
        candidates.append(Path(data_dir).expanduser() / name_or_path)
    candidates.append(Path(name_or_path).expanduser())
    for candidate in candidates:
        if candidate.is_dir():
            files = _local_split_files(candidate)
            if "train" not in files and (candidate / "train").is_dir():
                # <folder>/{train,test}/<label>/<images>: datasets' image folder builder
                return load_dataset("imagefolder", data_dir=str(candidate))
            if "train" not in files:
                raise DataError(f"{candidate} has no train.csv/.json/.jsonl/.parquet file (nor a train/ image folder)")
            return _read_files(files)
        if candidate.is_file():
            if candidate.suffix not in FILE_FORMATS:
                raise DataError(f"{candidate}: unsupported file type; use one of {sorted(FILE_FORMATS)}")
            return _read_files({"train": str(candidate)})
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise _not_found(name_or_path, data_dir, f"data dir {data_dir} does not exist")
    if not hub_reachable():
        raise _not_found(name_or_path, data_dir, "no local copy, and the Hugging Face hub is not reachable")
    try:
        return load_dataset(name_or_path, subset or None)
    except Exception as exc:  # datasets raises many types for "not there"
        raise _not_found(name_or_path, data_dir, f"{type(exc).__name__}: {exc}") from exc


def load_task(
    name_or_path: str,
    data_dir: str,
    settings: DataSettings,
    test_fraction: float = 0.1,
    seed: int = 0,
    task: str = "seq-cls",
) -> TaskData:
    """Load a text (``task = "seq-cls"``) or image (``"image-cls"``) classification task with integer labels
    and a global test split, or instruction data (``"causal-lm"``)."""
    raw = load_raw_dataset(name_or_path, data_dir, settings.subset)
    train_split = next((s for s in TRAIN_SPLITS if s in raw), None)
    if train_split is None:
        raise DataError(f"dataset {name_or_path!r} has no train split (splits: {list(raw)})")
    if task == "causal-lm":
        return _load_instructions(raw, train_split, name_or_path, settings, test_fraction, seed)
    train = raw[train_split]
    # the first held-out split that carries labels (GLUE's test splits are all -1)
    test_split = next((s for s in TEST_SPLITS if s in raw and _labelled(raw[s], settings.label_column)), None)
    test_split = next((s for s in raw if s.startswith("validation_matched")), test_split)  # MNLI
    if test_split is None:
        # No held-out split shipped: carve one, deterministically.
        parts = train.train_test_split(test_size=test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    else:
        test = raw[test_split]
    image = task == "image-cls"
    if image:
        inputs, hint = [settings.image_column], "data.image-column / data.label-column"
    else:
        inputs = [settings.text_column] + ([settings.text_pair_column] if settings.text_pair_column else [])
        hint = "data.text-column / data.text-pair-column / data.label-column"
    partition_column = settings.partition_column if settings.partitioner == "by-column" else ""
    for split_name, split, extra in (("train", train, [partition_column]), ("test", test, [])):
        missing = [c for c in (*inputs, settings.label_column, *extra) if c and c not in split.column_names]
        if missing:
            if partition_column in missing:
                hint += " / data.partition-column"
            raise DataError(
                f"dataset {name_or_path!r} ({split_name} split) has no column(s) {missing}; its columns are "
                f"{split.column_names}. Set {hint}."
            )
    for split_name, split in (("train", train), ("test", test)):
        _check_rows(split, split_name, name_or_path, [] if image else inputs, settings.label_column)
    unseen = _unseen_test_labels(train, test, settings.label_column)
    if unseen and settings.unseen_test_labels == "refuse":
        rows = _rows_where(test, settings.label_column, lambda v: str(v) in unseen)
        raise DataError(
            f"dataset {name_or_path!r}: label(s) {sorted(unseen)[:10]} appear only in the test split (test rows "
            f"{rows}): no client could ever learn them. Remove those rows, or set data.unseen-test-labels = "
            "'keep' to keep them (they are reported in the run's summary)"
        )
    train, test, label_names = _encode_labels(train, test, settings.label_column)
    train, test = _keep_and_cap(train, test, [*inputs, settings.label_column, partition_column], settings, seed)
    if image:
        train, test = (_as_images(split, settings.image_column) for split in (train, test))
    return TaskData(
        train,
        test,
        label_names,
        settings.text_column,
        settings.label_column,
        settings.text_pair_column,
        image_column=settings.image_column if image else "",
        partition_column=partition_column,
        unseen_test_labels=sorted(unseen),
    )


LABEL_PARTITIONERS = ("dirichlet", "shards", "label-proportion")


def _load_instructions(
    raw: DatasetDict, train_split: str, name: str, settings: DataSettings, test_fraction: float, seed: int
) -> TaskData:
    """Instruction data: train and test splits (a test split carved from train when none ships), the row format
    detected from the columns, rows without a prompt or response refused."""
    train = raw[train_split]
    test_split = next((s for s in TEST_SPLITS if s in raw), None)
    if test_split is None:
        parts = train.train_test_split(test_size=test_fraction, seed=seed)
        train, test = parts["train"], parts["test"]
    else:
        test = raw[test_split]
    fmt = detect_format(train.column_names, settings.prompt_column, settings.response_column, settings.prompt_template)
    partition_column = settings.partition_column if settings.partitioner == "by-column" else ""
    skew_column = settings.label_column if settings.partitioner in LABEL_PARTITIONERS else ""
    for column, hint in ((partition_column, "data.partition-column"), (skew_column, "data.label-column")):
        if column and column not in train.column_names:
            raise DataError(
                f"dataset {name!r} has no column {column!r} for partitioner {settings.partitioner!r} (columns: "
                f"{train.column_names}). Instruction data have no class label: use data.partitioner = 'iid', or "
                f"'by-column' with data.partition-column, or set {hint} to a column to split by"
            )
    for split_name, split in (("train", train), ("test", test)):
        _check_rows(split, split_name, name, [c for c in fmt.columns if c != "messages"], "")
    keep = [*fmt.columns, *fmt.template_fields, "input", partition_column, skew_column]
    train, test = _keep_and_cap(train, test, keep, settings, seed)
    return TaskData(
        train,
        test,
        [],
        fmt.columns[0],
        skew_column or settings.label_column,
        partition_column=partition_column,
        instruction_format=fmt,
    )


def _keep_and_cap(
    train: Dataset, test: Dataset, keep: list[str], settings: DataSettings, seed: int
) -> tuple[Dataset, Dataset]:
    """Only the ``keep`` columns, and at most ``data.max-train-examples`` / ``max-test-examples`` rows (a seeded
    shuffle first, so a cap is a random subset, not the file's first rows)."""
    train, test = (split.remove_columns([c for c in split.column_names if c not in keep]) for split in (train, test))
    if settings.max_train_examples:
        train = train.shuffle(seed=seed).select(range(min(settings.max_train_examples, len(train))))
    if settings.max_test_examples:
        test = test.shuffle(seed=seed).select(range(min(settings.max_test_examples, len(test))))
    return train, test


def _labelled(split: Dataset, column: str) -> bool:
    if column not in split.column_names or len(split) == 0:
        return True  # let the column and row checks say what is wrong
    return any(v not in (-1, None) for v in split[column][:1000])


def _rows_where(split: Dataset, column: str, bad: Callable[[object], bool], limit: int = 10) -> str:
    """The first ``limit`` 1-based row numbers (not counting a header) whose ``column`` value is bad."""
    rows = [index + 1 for index, value in enumerate(split[column]) if bad(value)]
    shown = ", ".join(map(str, rows[:limit]))
    return f"{shown} and {len(rows) - limit} more" if len(rows) > limit else shown


def _blank(value: object) -> bool:
    return (
        value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip())
    )


def _check_rows(split: Dataset, split_name: str, name: str, text_columns: list[str], label_column: str) -> None:
    """A split has rows, every row has text and a label: anything else is refused with the row numbers."""
    if len(split) == 0:
        raise DataError(f"dataset {name!r}: the {split_name} split has no rows (only a header?)")
    for column, what in [*((c, "text") for c in text_columns), *([(label_column, "label")] if label_column else [])]:
        if any(_blank(v) for v in split[column]):
            raise DataError(
                f"dataset {name!r}: {split_name} rows {_rows_where(split, column, _blank)} have no {what} in column "
                f"{column!r} (rows count from 1, after the header). Fill or drop them"
            )


def _unseen_test_labels(train: Dataset, test: Dataset, column: str) -> set[str]:
    if isinstance(train.features[column], ClassLabel):
        return set()
    return {str(v) for v in test[column]} - {str(v) for v in train[column]}


def _as_images(split: Dataset, column: str) -> Dataset:
    """An image column stays a datasets Image feature (decoded to PIL on access); file paths become one."""
    if isinstance(split.features[column], ImageFeature):
        return split
    return split.cast_column(column, ImageFeature())


def _encode_labels(train: Dataset, test: Dataset, column: str) -> tuple[Dataset, Dataset, list[str]]:
    feature = train.features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = sorted({str(v) for v in train[column]} | {str(v) for v in test[column]})
        # Integer labels stay in numeric order; string class names are sorted alphabetically.
        if all(v.lstrip("-").isdigit() for v in values):
            values = sorted(values, key=int)
        names = values
    class_label = ClassLabel(names=names)

    def encode(split: Dataset) -> Dataset:
        if isinstance(split.features[column], ClassLabel):
            return split
        split = split.map(lambda batch: {column: [class_label.str2int(str(v)) for v in batch[column]]}, batched=True)
        return split.cast_column(column, class_label)

    return encode(train), encode(test), names


# ---- partitioning -----------------------------------------------------------------------------
class LabelProportionPartitioner(Partitioner):
    """FFA-LoRA's fixed label-proportion split: client k draws its examples with class proportions p_k.

    Default proportions (none given): client k has 0.9 of its data from class k mod C and the rest spread
    evenly over the other classes, e.g. [.9, .1] / [.1, .9] for two classes, [.9, .05, .05] + permutations
    for three. Client sizes are equal; examples are drawn without replacement.
    """

    def __init__(
        self, num_partitions: int, partition_by: str, proportions: list[list[float]] | None = None, seed: int = 42
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._proportions = proportions or []
        self._seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _default_proportions(self, num_classes: int) -> np.ndarray:
        table = np.full((self._num_partitions, num_classes), 0.1 / max(num_classes - 1, 1))
        for k in range(self._num_partitions):
            table[k, k % num_classes] = 0.9
        return table

    def _build(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self._partition_by])
        classes = np.unique(labels)
        table = np.asarray(self._proportions, dtype=float) if self._proportions else None
        if table is None:
            table = self._default_proportions(len(classes))
        if table.shape != (self._num_partitions, len(classes)):
            raise DataError(
                f"data.label-proportions must be {self._num_partitions} rows x {len(classes)} classes, "
                f"got {table.shape}"
            )
        table = table / table.sum(axis=1, keepdims=True)
        rng = np.random.default_rng(self._seed)
        pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
        # Equal client sizes, as large as the scarcest class allows.
        demand = table.sum(axis=0)
        per_client = int(min(len(pools[c]) / demand[i] for i, c in enumerate(classes) if demand[i] > 0))
        partitions = []
        for k in range(self._num_partitions):
            counts = _round_preserving_sum(table[k] * per_client, per_client)
            chosen = []
            for i, c in enumerate(classes):
                chosen.extend(pools[c][: counts[i]])
                pools[c] = pools[c][counts[i] :]
            partitions.append(rng.permutation(np.asarray(chosen, dtype=int)))
        return partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if self._indices is None:
            self._indices = self._build()
        return self.dataset.select(self._indices[partition_id])


def _round_preserving_sum(values: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding: integers that sum to ``total`` and stay within 1 of ``values``."""
    counts = np.floor(values).astype(int)
    remainder = total - counts.sum()
    counts[np.argsort(-(values - counts))[:remainder]] += 1
    return counts


def make_partitioner(settings: DataSettings, num_clients: int, seed: int, num_examples: int) -> Partitioner:
    by = settings.label_column
    if settings.partitioner == "by-column":
        # Feature non-IID: one client per value of the column (e.g. a domain), flwr-datasets' natural-id split.
        return NaturalIdPartitioner(partition_by=settings.partition_column)
    if settings.partitioner == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if settings.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            alpha=settings.dirichlet_alpha,
            min_partition_size=settings.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    if settings.partitioner == "shards":
        return ShardPartitioner(
            num_partitions=num_clients, partition_by=by, num_shards_per_partition=settings.shards_per_client, seed=seed
        )
    if settings.partitioner == "label-proportion":
        return LabelProportionPartitioner(num_clients, by, settings.label_proportions, seed=seed)
    if settings.partitioner == "quantity-skew":
        return QuantitySkewPartitioner(
            num_examples, num_clients, settings.dirichlet_alpha, settings.min_partition_size, seed
        )
    raise DataError(f"unknown partitioner {settings.partitioner!r}")


class QuantitySkewPartitioner(SizePartitioner):
    """Quantity skew (NIID-Bench's): client sizes from Dirichlet(α) over the clients, each at least
    ``min_size`` (and 1), labels IID. flwr-datasets' ``SizePartitioner`` cuts consecutive rows, so the rows are
    shuffled with the seed first. Unlike the label-skew Dirichlet, whose redraws give up when hundreds of
    clients share a few thousand examples, it can give every client data whenever there are enough examples."""

    def __init__(self, num_examples: int, num_clients: int, alpha: float, min_size: int, seed: int) -> None:
        min_size = max(1, min_size)
        spare = num_examples - num_clients * min_size
        if spare < 0:
            raise DataError(
                f"quantity-skew gives every client at least {min_size} example(s): {num_examples} examples cannot "
                f"cover {num_clients} clients; use fewer clients, a smaller data.min-partition-size, or more data"
            )
        shares = np.random.default_rng(seed).dirichlet([alpha] * num_clients) * spare
        super().__init__([int(n) + min_size for n in _round_preserving_sum(shares, spare)])
        self.seed = seed

    @Partitioner.dataset.setter  # type: ignore[attr-defined,misc]
    def dataset(self, value: Dataset) -> None:
        Partitioner.dataset.fset(self, value.shuffle(seed=self.seed))  # type: ignore[attr-defined]


@dataclass
class ClientSplit:
    train: Dataset
    validation: Dataset


class ClientPartitions(Sequence[ClientSplit]):
    """Every client's train and validation share, made on first use: a federation of 10,000 registered clients
    that samples 100 a round cuts out and splits only those 100 shares, not all 10,000 (flwr-datasets selects a
    share in ~2 ms, so up front that was 21 s for 10,000 IID clients on a 2-core CPU). Who gets which examples
    is drawn once, for all clients together, by flwr-datasets' partitioner; a client's share and split are the
    same whenever and in whatever order it is asked for (the split seeded by the run's seed and the index)."""

    def __init__(
        self, load_share: Callable[[int], Dataset], num_clients: int, validation_fraction: float, seed: int
    ) -> None:
        self._load_share, self._num_clients = load_share, num_clients
        self._validation_fraction, self._seed = validation_fraction, seed
        self._splits: dict[int, ClientSplit] = {}

    def __len__(self) -> int:
        return self._num_clients

    @overload
    def __getitem__(self, index: int) -> ClientSplit: ...
    @overload
    def __getitem__(self, index: slice) -> list[ClientSplit]: ...
    def __getitem__(self, index: int | slice) -> ClientSplit | list[ClientSplit]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        k = index + len(self) if index < 0 else index
        if not 0 <= k < len(self):
            raise IndexError(f"client {index} of {len(self)}")
        if k not in self._splits:
            self._splits[k] = self._split(k)
        return self._splits[k]

    def _split(self, k: int) -> ClientSplit:
        share = self._load_share(k)
        n_val = int(round(len(share) * self._validation_fraction))
        if n_val == 0 or len(share) - n_val < 1:
            return ClientSplit(train=share, validation=share.select([]))
        parts = share.train_test_split(test_size=n_val, seed=self._seed + k)
        return ClientSplit(train=parts["train"], validation=parts["test"])


def _never_empty(settings: DataSettings) -> bool:
    """Partitioners that cannot leave a client without data (given at least as many examples as clients): IID
    shards, one client per column value, quantity skew (one example each at least), and Dirichlet with a minimum
    size, which flwr-datasets redraws until every client has it. Only the others are checked for empty clients
    up front (cutting out every share)."""
    return settings.partitioner in ("iid", "by-column", "quantity-skew") or (
        settings.partitioner == "dirichlet" and settings.min_partition_size >= 1
    )


def partition(train: Dataset, settings: DataSettings, num_clients: int, seed: int) -> ClientPartitions:
    """Split ``train`` across clients; each client's share is cut out and split into its own train/validation on
    first use."""
    if num_clients > len(train):
        raise DataError(
            f"{num_clients} clients but only {len(train)} training examples: every client needs data; "
            "use fewer clients or more data"
        )
    partitioner = make_partitioner(settings, num_clients, seed, len(train))
    partitioner.dataset = train
    by_column = isinstance(partitioner, NaturalIdPartitioner)
    if by_column and partitioner.num_partitions != num_clients:
        values = list(partitioner.partition_id_to_natural_id.values())
        raise DataError(
            f"data.partition-column {settings.partition_column!r} has {len(values)} distinct value(s) "
            f"{values[:10]}, and the by-column partitioner gives one client to each: set "
            f"num-clients = {len(values)}"
        )
    try:
        # The first share draws every client's (flwr-datasets assigns all at once, on first use); it draws a
        # progress bar while it indexes a column's values: keep the console clean.
        with redirect_stderr(io.StringIO()) if by_column else nullcontext():
            first = partitioner.load_partition(0)
    except ValueError as exc:
        raise DataError(f"could not partition {len(train)} examples over {num_clients} clients: {exc}") from exc
    shares = {0: first}

    def share(k: int) -> Dataset:
        if k not in shares:
            shares[k] = partitioner.load_partition(k)
        return shares[k]

    def load_share(k: int) -> Dataset:  # the client's split keeps its share from now on
        return shares.pop(k) if k in shares else partitioner.load_partition(k)

    if not _never_empty(settings):
        empty = [k for k in range(num_clients) if len(share(k)) == 0]
        if empty:
            raise DataError(
                f"client(s) {empty[:10]} would get no data with partitioner {settings.partitioner!r}; "
                "use fewer clients, a larger dirichlet-alpha, or more data"
            )
    return ClientPartitions(load_share, num_clients, settings.validation_fraction, seed)


def label_histogram(dataset: Dataset, label_column: str, num_labels: int) -> np.ndarray:
    return np.bincount(np.asarray(dataset[label_column], dtype=int), minlength=num_labels)


# ---- tokenization ---------------------------------------------------------------------------------
def tokenize(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    label_column: str,
    max_length: int,
    text_pair_column: str = "",
) -> Dataset:
    """Tokenize without padding (padding happens per batch in the collator), labels as ``labels``."""

    def encode(batch: dict) -> dict:
        pair = batch[text_pair_column] if text_pair_column else None
        encoded = tokenizer(batch[text_column], pair, truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    # datasets would fingerprint ``encode`` by pickling the whole tokenizer (≈0.6 s per call: most of a simulated
    # client's first round); a fingerprint from what determines the output is as unique and costs nothing.
    recipe = "|".join(
        [
            dataset._fingerprint,
            str(getattr(tokenizer, "name_or_path", "")),
            type(tokenizer).__name__,
            str(len(tokenizer)),
            text_column,
            text_pair_column,
            label_column,
            str(max_length),
        ]
    )
    fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:32]
    with _quiet_progress():
        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)


@contextmanager
def _quiet_progress():
    """Tokenizing a client's few hundred examples needs no progress bar of its own."""
    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


PADDED_ROWS_MAX_TOKENS = 1 << 22  # 4M padded tokens: ~100 MB of int64 for three token tensors


class PaddedRows(TorchDataset):
    """A tokenized split collated once, right-padded to its longest example: a batch is a gather of rows
    trimmed to the batch's longest example, the very tensors the padding collator builds from those rows.

    Why: reading a batch from Arrow and padding it in Python costs ~0.6 ms, once per client and step; with
    hundreds of one-step clients a round that was most of the time outside forward and backward. Items are
    indices (``DataLoader`` fetches a batch with one ``__getitems__`` call); ``batch`` is the collate function.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], lengths: torch.Tensor) -> None:
        self.tensors, self.lengths = tensors, lengths
        self._length_list = lengths.tolist()  # a batch's width in Python: 0.5 µs against 7 for a tensor max
        self.ids: list[int] | None = None  # a subset's rows in the tensors (None: all of them, in order)

    @classmethod
    def build(cls, dataset: Dataset, collator: Callable[[list[dict]], dict[str, torch.Tensor]]) -> PaddedRows | None:
        """None when the split is empty or too large to hold padded (then batches are collated as drawn)."""
        if len(dataset) == 0 or "input_ids" not in dataset.column_names:
            return None
        plain = dataset.with_format(None)
        lengths = torch.tensor([len(ids) for ids in plain["input_ids"]])
        if len(dataset) * int(lengths.max()) > PADDED_ROWS_MAX_TOKENS:
            return None
        return cls(collator(list(plain)), lengths)

    def subset(self, ids: list[int]) -> PaddedRows:
        """Rows ``ids`` of this split as a split of their own (item i is row ``ids[i]``), sharing its tensors:
        the same batches as the subset collated alone (padding trimmed to each batch's longest example), and
        many subsets' batches gather from one tensor together (``source_rows``, ``rows_batch``)."""
        if any(not 0 <= i < len(self._length_list) for i in ids):
            raise IndexError(f"subset rows must lie in 0..{len(self._length_list) - 1}")
        subset = copy.copy(self)  # the same tensors and lengths, no second ``tolist``
        subset.ids = list(ids)
        return subset

    def __len__(self) -> int:
        return len(self.lengths) if self.ids is None else len(self.ids)

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> list[int]:
        return indices

    def source_rows(self, indices: list[int]) -> list[int]:
        """Items ``indices`` as rows of the tensors (a subset's items are its ``ids``)."""
        return indices if self.ids is None else [self.ids[i] for i in indices]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.rows_batch(self.source_rows(indices))

    def rows_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """Rows ``rows`` of the tensors, trimmed to their longest example."""
        index = torch.as_tensor(rows, dtype=torch.long)
        width = max(map(self._length_list.__getitem__, rows))
        return {key: t[index, :width] if t.dim() == 2 else t.index_select(0, index) for key, t in self.tensors.items()}


class RowBatches:
    """The batches ``DataLoader(rows, batch_size, shuffle, collate_fn=rows.batch, generator=generator)`` gives,
    in the same order from the same generator draws, without the loader's machinery: each pass draws the
    seed the loader draws for its workers, then the sampler's permutation, and one more permutation where the
    sampler runs dry, exactly when the loader would (``row_batches_match_loader`` checks this against the
    installed torch). Why: starting a ``DataLoader`` pass costs ≈0.04 ms, as much as a one-step client's
    whole batch; hundreds of such clients a round."""

    def __init__(self, rows: PaddedRows, batch_size: int, shuffle: bool, generator: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.generator = rows, batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return map(self.dataset.batch, self.draws())

    def draws(self) -> Iterator[list[int]]:
        """One pass's batches as the items they hold (what ``__iter__`` gathers), from the same draws."""
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader's worker seed
        batch: list[int] = []
        for index in self._order():
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def rows(self) -> BatchRows:
        """Its passes as the rows of the shared tensors each batch holds (``BatchRows``)."""
        return BatchRows(self)

    def _order(self) -> Iterator[int]:
        count = len(self.dataset)
        if not self.shuffle:
            yield from range(count)
            return
        yield from torch.randperm(count, generator=self.generator).tolist()
        torch.randperm(count, generator=self.generator)  # RandomSampler's remainder draw (num_samples % n == 0)


@dataclass(frozen=True)
class BatchRows:
    """A ``RowBatches``' batches, pass after pass, as the rows of its split's tensors they hold (``PaddedRows.
    source_rows``): what the batched engine draws for each of many clients cut from one split, to gather all
    their rows of a step in one pass (``PaddedRows.rows_batch``) instead of one batch per client."""

    loader: RowBatches

    def __iter__(self) -> Iterator[list[int]]:
        return map(self.loader.dataset.source_rows, self.loader.draws())


Loader = DataLoader | RowBatches  # what make_loader gives: an iterable of batches with ``.dataset`` and len()


@functools.cache
def row_batches_match_loader() -> bool:
    """Whether ``RowBatches`` draws what ``DataLoader`` draws with the installed torch: sizes with and without a
    short last batch, two whole passes and a cut one, shuffled and in order. Where a torch release samples
    otherwise, loaders are ``DataLoader`` s again (slower, never different)."""
    for count, batch_size, shuffle in ((1, 8, True), (8, 4, True), (13, 5, True), (7, 3, False)):
        rows = PaddedRows({"labels": torch.arange(count)}, torch.ones(count, dtype=torch.long))
        ours = RowBatches(rows, batch_size, shuffle, torch.Generator().manual_seed(count))
        reference = DataLoader(
            rows, batch_size, shuffle=shuffle, collate_fn=rows.batch, generator=torch.Generator().manual_seed(count)
        )
        drawn = [[b["labels"].tolist() for b in loader] for loader in (ours, reference) for _ in range(2)]
        cut = [next(iter(loader))["labels"].tolist() for loader in (ours, reference)]
        again = [next(iter(loader))["labels"].tolist() for loader in (ours, reference)]
        if drawn[:2] != drawn[2:] or cut[0] != cut[1] or again[0] != again[1] or len(ours) != len(reference):
            return False
    return True


def padding_is_right(tokenizer: PreTrainedTokenizerBase | ImageProcessingMixin, token_labels: bool) -> bool:
    """Whether the collator pads on the right (what ``PaddedRows`` trims): instruction data always are."""
    if isinstance(tokenizer, ImageProcessingMixin):
        return False
    return token_labels or getattr(tokenizer, "padding_side", "right") == "right"


def make_loader(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase | ImageProcessingMixin,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    token_labels: bool = False,
    rows: PaddedRows | None = None,
) -> Loader:
    """Text: batches padded to the longest sequence in the batch (fixed-length padding was ~3x slower).
    Images (``tokenizer`` is an image processor, ``dataset`` from ``prepare_images``): stacked pixel_values.
    ``token_labels``: a label per token (instruction data), padded with -100. ``rows``: ``dataset`` collated
    once (``PaddedRows``): the same batches in the same order, gathered instead of collated."""
    generator = torch.Generator().manual_seed(seed)
    if rows is not None:
        if row_batches_match_loader():
            return RowBatches(rows, batch_size, shuffle, generator)
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=rows.batch, generator=generator)
    collator = make_collator(tokenizer, token_labels)
    if not isinstance(tokenizer, ImageProcessingMixin) and dataset.format["type"] is not None:
        dataset = dataset.with_format(None)  # (images keep their on-the-fly transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator, generator=generator)


def make_collator(
    tokenizer: PreTrainedTokenizerBase | ImageProcessingMixin, token_labels: bool = False
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The batch collator for examples prepared with ``tokenizer``: padding for text (token labels with -100),
    stacking for images."""
    if isinstance(tokenizer, ImageProcessingMixin):
        return collate_images
    if token_labels:
        return InstructionCollator(tokenizer.pad_token_id)
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


# ---- images ---------------------------------------------------------------------------------------
def prepare_images(dataset: Dataset, processor: ImageProcessingMixin, image_column: str, label_column: str) -> Dataset:
    """Examples as ``{"pixel_values": (3, H, W) float tensor, "labels": int}``, computed on access.

    Lazy (``with_transform``): an image becomes pixel values only when its batch is drawn, so memory holds
    the compressed images, not ~0.6 MB of floats per 224 x 224 example (DomainNet: ~600k images). The
    processor (e.g. ViT's: resize, rescale, normalize) runs again each epoch. Random access by index list
    (``DataLoader`` batches, DP-SGD's Poisson batches) works as for tokenized text.
    """

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[image_column]]
        if not images:  # an empty index list (an empty Poisson batch) gives an empty batch
            return {"pixel_values": [], "labels": []}
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column], dtype=torch.long)}

    return dataset.select_columns([image_column, label_column]).with_transform(transform)


def collate_images(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Stack prepared image examples into ``pixel_values`` (B, 3, H, W) and ``labels`` (B,)."""
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
        "labels": torch.stack([torch.as_tensor(row["labels"], dtype=torch.long) for row in rows]),
    }
