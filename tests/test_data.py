import numpy as np
import pytest

from fedlowrank.config import DataSettings
from fedlowrank.data import DataError, label_histogram, load_task, make_loader, partition, tokenize


@pytest.fixture(scope="module")
def trec(data_dir):
    return load_task("trec", str(data_dir), DataSettings())


def _skew(task, splits):
    """Mean total-variation distance between each client's label distribution and the global one."""
    global_hist = label_histogram(task.train, "label", task.num_labels)
    global_dist = global_hist / global_hist.sum()
    distances = []
    for split in splits:
        hist = label_histogram(split.train, "label", task.num_labels) + label_histogram(
            split.validation, "label", task.num_labels
        )
        distances.append(0.5 * np.abs(hist / hist.sum() - global_dist).sum())
    return float(np.mean(distances))


def test_trec_loads_with_six_named_classes(trec):
    assert len(trec.train) == 5452 and len(trec.test) == 500
    assert trec.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert set(trec.train["label"]) == set(range(6))
    assert trec.train.column_names == ["text", "label"]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards", "label-proportion"])
def test_partitions_are_disjoint_and_nonempty(trec, partitioner):
    settings = DataSettings(partitioner=partitioner, dirichlet_alpha=0.5)
    indexed = trec.train.add_column("row", list(range(len(trec.train))))
    splits = partition(indexed, settings, num_clients=6, seed=0)
    rows = [r for s in splits for r in list(s.train["row"]) + list(s.validation["row"])]
    assert all(len(s.train) > 0 for s in splits)
    assert len(rows) == len(set(rows))  # no example is given to two clients
    if partitioner in ("iid", "dirichlet"):
        assert len(rows) == len(trec.train)  # and none is dropped
    for s in splits:  # the validation fraction is honoured per client
        n = len(s.train) + len(s.validation)
        assert abs(len(s.validation) - round(0.1 * n)) <= 1


def test_dirichlet_label_skew_is_measurable_and_grows_as_alpha_shrinks(trec):
    iid = _skew(trec, partition(trec.train, DataSettings(partitioner="iid"), 10, 0))
    mild = _skew(trec, partition(trec.train, DataSettings(partitioner="dirichlet", dirichlet_alpha=5.0), 10, 0))
    strong = _skew(trec, partition(trec.train, DataSettings(partitioner="dirichlet", dirichlet_alpha=0.1), 10, 0))
    assert iid < 0.05
    assert mild > iid
    assert strong > mild + 0.2


def test_partitioning_is_deterministic_given_the_seed(trec):
    first = partition(trec.train, DataSettings(), 10, seed=3)
    second = partition(trec.train, DataSettings(), 10, seed=3)
    other = partition(trec.train, DataSettings(), 10, seed=4)
    assert [list(s.train["text"]) for s in first] == [list(s.train["text"]) for s in second]
    assert [len(s.train) for s in first] != [len(s.train) for s in other]


def test_label_proportion_split_matches_ffa_pattern(data_dir):
    sst2 = load_task("sst2", str(data_dir), DataSettings(max_train_examples=4000))
    settings = DataSettings(
        partitioner="label-proportion", label_proportions=[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]], validation_fraction=0.0
    )
    splits = partition(sst2.train, settings, 3, seed=0)
    sizes = {len(s.train) for s in splits}
    assert len(sizes) == 1  # equal client sizes
    fractions = [label_histogram(s.train, "label", 2) / len(s.train) for s in splits]
    np.testing.assert_allclose(fractions, [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]], atol=0.01)


def test_default_label_proportions_put_ninety_percent_on_one_class(trec):
    splits = partition(trec.train, DataSettings(partitioner="label-proportion", validation_fraction=0.0), 6, 0)
    for k, split in enumerate(splits):
        hist = label_histogram(split.train, "label", 6)
        assert hist.argmax() == k
        assert hist[k] / hist.sum() == pytest.approx(0.9, abs=0.02)


def test_dynamic_padding_pads_each_batch_to_its_longest_example(trec):
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    data = tokenize(trec.train.select(range(64)), tokenizer, "text", "label", max_length=64)
    lengths = [len(ids) for ids in data["input_ids"]]
    loader = make_loader(data, tokenizer, batch_size=8, shuffle=False)
    widths = []
    for i, batch in enumerate(loader):
        widths.append(batch["input_ids"].shape[1])
        assert widths[-1] == max(lengths[i * 8 : (i + 1) * 8])
        assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert len(set(widths)) > 1


def test_a_split_collated_once_gives_the_collators_batches_in_the_loaders_order(trec):
    """``PaddedRows``: gathered and trimmed rows are exactly the batches the padding collator builds, in the
    order the plain loader draws them (same seed), for shuffled training and sequential evaluation alike."""
    import torch

    from fedlowrank.data import PaddedRows, make_collator
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    data = tokenize(trec.train.select(range(53)), tokenizer, "text", "label", max_length=64)
    rows = PaddedRows.build(data, make_collator(tokenizer))
    assert rows is not None and len(rows) == 53
    for batch_size, shuffle in ((8, True), (5, False)):
        plain = make_loader(data, tokenizer, batch_size, shuffle, seed=7)
        gathered = make_loader(data, tokenizer, batch_size, shuffle, seed=7, rows=rows)
        pairs = list(zip(plain, gathered, strict=True))
        for want, got in pairs:
            assert want.keys() == got.keys()
            for key in want:
                assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
        assert len({want["input_ids"].shape[1] for want, _ in pairs}) > 1  # trimmed per batch, not padded to 64
    assert PaddedRows.build(data.select([]), make_collator(tokenizer)) is None


def test_a_subset_of_a_split_collated_once_batches_as_if_collated_alone(trec):
    """``PaddedRows.subset`` (a client's rows of the training set collated once) gives the batches of the
    subset collated on its own, in the same order; ``RowBatches.rows`` draws the same batches as rows of the
    shared tensors, and one ``rows_batch`` of several subsets' rows is their batches padded and stacked."""
    import torch

    from fedlowrank.data import PaddedRows, make_collator
    from fedlowrank.engine.batched import _pad_and_concat
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    data = tokenize(trec.train.select(range(60)), tokenizer, "text", "label", max_length=64)
    whole = PaddedRows.build(data, make_collator(tokenizer))
    parts = [[5, 17, 3, 40, 41, 2, 59], [30, 1], [8, 9, 10, 11, 12, 13, 14, 15, 16, 50, 51]]
    batches, rows = [], []
    for ids in parts:
        alone = PaddedRows.build(data.select(ids), make_collator(tokenizer))
        subset = whole.subset(ids)
        assert len(subset) == len(ids) and subset.tensors is whole.tensors
        want = list(make_loader(None, tokenizer, 4, True, seed=3, rows=alone))
        got = list(make_loader(None, tokenizer, 4, True, seed=3, rows=subset))
        drawn = list(make_loader(None, tokenizer, 4, True, seed=3, rows=subset).rows())
        for a, b, r in zip(want, got, drawn, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert all(torch.equal(whole.rows_batch(r)[k], a[k]) for k in a)
        batches.append(want[0])
        rows.extend(drawn[0])
    together, padded = whole.rows_batch(rows), _pad_and_concat(batches)
    assert all(torch.equal(together[k], padded[k]) for k in padded)
    with pytest.raises(IndexError):
        whole.subset([0, 60])


def test_row_batches_draw_what_the_data_loader_draws(monkeypatch):
    """``RowBatches`` (what ``make_loader`` gives for a split collated once) yields the ``DataLoader``'s
    batches in its order from the same generator: every size from 1 to 29 (short last batches included),
    three batch sizes, shuffled and in order, three whole passes then a cut one; a ``RowBatches`` that skipped
    one of the loader's generator draws is caught by the check that guards it."""
    import torch
    from torch.utils.data import DataLoader

    from fedlowrank import data as data_module
    from fedlowrank.data import PaddedRows, RowBatches, row_batches_match_loader

    for count in range(1, 30):
        rows = PaddedRows({"labels": torch.arange(count)}, torch.ones(count, dtype=torch.long))
        for batch_size, shuffle in ((1, True), (3, True), (8, True), (4, False)):
            seed = 31 * count + batch_size
            ours = make_loader(rows, None, batch_size, shuffle, seed=seed, rows=rows)
            assert isinstance(ours, RowBatches)
            reference = DataLoader(
                rows, batch_size, shuffle=shuffle, collate_fn=rows.batch, generator=torch.Generator().manual_seed(seed)
            )
            assert len(ours) == len(reference)
            for _ in range(3):
                assert [b["labels"].tolist() for b in ours] == [b["labels"].tolist() for b in reference]
            assert torch.equal(next(iter(ours))["labels"], next(iter(reference))["labels"])
            assert torch.equal(next(iter(ours))["labels"], next(iter(reference))["labels"])
    with pytest.raises(ValueError, match="batch_size"):
        RowBatches(rows, 0, True, torch.Generator())

    def without_the_remainder_draw(self):
        yield from torch.randperm(len(self.dataset), generator=self.generator).tolist()

    assert row_batches_match_loader()
    monkeypatch.setattr(data_module.RowBatches, "_order", without_the_remainder_draw)
    assert not row_batches_match_loader.__wrapped__()


def test_quantity_skew_gives_hundreds_of_clients_uneven_sizes_every_one_some_data(trec):
    """512 clients over 4,096 questions: the label-skew Dirichlet gives up (some client stays empty), quantity
    skew gives every client at least its minimum, sizes spread by α, labels IID, and every example used once."""
    rows = trec.train.select(range(4096)).add_column("row", list(range(4096)))
    skewed = DataSettings(partitioner="dirichlet", dirichlet_alpha=0.5, min_partition_size=1, validation_fraction=0.0)
    with pytest.raises(DataError, match="could not partition 4096 examples over 512 clients"):
        partition(rows, skewed, num_clients=512, seed=0)
    settings = DataSettings(
        partitioner="quantity-skew", dirichlet_alpha=0.5, min_partition_size=2, validation_fraction=0.0
    )
    splits = partition(rows, settings, num_clients=512, seed=0)
    sizes = np.array([len(splits[k].train) for k in range(512)])
    assert sizes.sum() == 4096 and sizes.min() >= 2 and sizes.max() >= 8 * np.median(sizes)
    used = sorted(r for k in range(512) for r in splits[k].train["row"])
    assert used == list(range(4096))
    assert _skew(trec, [splits[k] for k in np.argsort(-sizes)[:20]]) < 0.15  # the largest clients look IID
    again = partition(rows, settings, num_clients=512, seed=0)
    assert [len(again[k].train) for k in range(512)] == list(sizes)
    with pytest.raises(DataError, match="cannot cover 512 clients"):
        partition(rows.select(range(1000)), settings, num_clients=512, seed=0)


# ---- bad input ---------------------------------------------------------------------------------
def test_unknown_dataset_says_how_to_point_at_local_files(data_dir):
    with pytest.raises(DataError, match="--data-dir") as info:
        load_task("no-such-dataset-xyz", str(data_dir), DataSettings())
    assert "FEDLOWRANK_DATA" in str(info.value)


def test_missing_column_is_named(data_dir):
    with pytest.raises(DataError, match=r"no column\(s\) \['sentence'\].*text-column"):
        load_task("trec", str(data_dir), DataSettings(text_column="sentence"))


def test_more_clients_than_examples(trec):
    with pytest.raises(DataError, match="only 20 training examples"):
        partition(trec.train.select(range(20)), DataSettings(partitioner="iid"), 30, 0)


def test_a_client_left_without_data_is_refused(trec):
    # 6 classes, 2 shards each: a 7th client cannot get a shard of a 10-example dataset.
    tiny = trec.train.select(range(30))
    with pytest.raises(DataError, match="no data|could not partition"):
        partition(tiny, DataSettings(partitioner="dirichlet", dirichlet_alpha=0.01, min_partition_size=0), 25, 0)


def test_local_files_by_path_and_other_formats(tmp_path, trec):
    folder = tmp_path / "mytask"
    folder.mkdir()
    trec.train.select(range(50)).to_json(folder / "train.jsonl")
    trec.test.select(range(20)).to_parquet(folder / "test.parquet")
    with pytest.raises(DataError, match="mixed file formats"):
        load_task(str(folder), "", DataSettings())
    (folder / "test.parquet").unlink()
    trec.test.select(range(20)).to_json(folder / "test.jsonl")
    task = load_task(str(folder), "", DataSettings())
    assert len(task.train) == 50 and len(task.test) == 20
    single = tmp_path / "only.csv"
    trec.train.select(range(100)).to_csv(single)
    task = load_task(str(single), "", DataSettings())  # no test split shipped: 10 % carved out
    assert len(task.train) == 90 and len(task.test) == 10


def test_sentence_pair_columns_are_encoded_as_pairs(tmp_path, trec):
    from fedlowrank.models import load_tokenizer

    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = trec.train.select(range(40))
    pairs = rows.map(lambda r: {"hypothesis": r["text"][::-1]})
    pairs.to_csv(folder / "train.csv")
    pairs.select(range(10)).to_csv(folder / "test.csv")
    settings = DataSettings(text_pair_column="hypothesis")
    task = load_task(str(folder), "", settings)
    assert sorted(task.train.column_names) == ["hypothesis", "label", "text"]
    tokenizer = load_tokenizer("minilm")
    encoded = tokenize(task.train, tokenizer, "text", "label", 64, text_pair_column="hypothesis")
    assert all(1 in ids for ids in encoded["token_type_ids"])  # the second segment is marked
    with pytest.raises(DataError, match="no column"):
        load_task(str(folder), "", DataSettings(text_pair_column="premise"))


def test_client_splits_are_made_on_first_use_and_do_not_depend_on_the_order_asked(trec):
    """10,000 registered clients must not all be split up front: a split is made when a client is asked for,
    and is the same whichever clients were asked before it."""
    settings = DataSettings(partitioner="iid")
    first = partition(trec.train, settings, num_clients=500, seed=3)
    assert first._splits == {}  # nothing split yet
    late = first[499]
    assert set(first._splits) == {499}
    second = partition(trec.train, settings, num_clients=500, seed=3)
    for k in (0, 250, 499):  # a different order of first use
        assert list(second[k].train["text"]) == list(first[k].train["text"])
        assert list(second[k].validation["text"]) == list(first[k].validation["text"])
    assert first[-1] is late and len(first) == 500 and len(first[:3]) == 3
    with pytest.raises(IndexError):
        first[500]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shards", "quantity-skew"])
def test_a_clients_share_is_cut_out_on_first_use_and_is_the_partitioners(trec, partitioner, monkeypatch):
    """Who gets what is drawn once for every client, but a share is selected only when its client is first used
    (10,000 registered clients cost one assignment, not 10,000 selections); the shares are flwr-datasets' own.
    Partitioners that may leave a client empty (shards) still cut every share up front to check."""
    from fedlowrank.data import make_partitioner

    settings = DataSettings(partitioner=partitioner, validation_fraction=0.0, min_partition_size=1)
    indexed = trec.train.add_column("row", list(range(len(trec.train))))
    reference = make_partitioner(settings, 400, 5, len(indexed))
    reference.dataset = indexed
    expected = {k: list(reference.load_partition(k)["row"]) for k in (399, 7, 123)}

    cut = []
    original = type(reference).load_partition
    monkeypatch.setattr(type(reference), "load_partition", lambda self, k: cut.append(k) or original(self, k))
    splits = partition(indexed, settings, num_clients=400, seed=5)
    assert len(splits) == 400
    assert sorted(set(cut)) == ([0] if partitioner != "shards" else list(range(400)))
    for k, rows in expected.items():
        assert list(splits[k].train["row"]) == rows
    if partitioner != "shards":
        assert sorted(set(cut)) == [0, 7, 123, 399]
