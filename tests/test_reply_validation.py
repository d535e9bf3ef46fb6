"""Hostile and broken replies never reach a method's math: a fuzzer mixes malformed replies (wrong keys, shapes,
dtypes, ranks, NaN/Inf, huge updates, impossible example counts, truncated arrays, missing records, a wrong A)
with good ones for every method; every bad one is rejected with a reason, no good one is, and the global adapter
stays finite. Then the same on a real federation with a client that diverges."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, Message, RecordDict

from fedlowrank.adapters import LayerFactors, factor_state
from fedlowrank.config import RunConfig
from fedlowrank.protocol import TrainReply, a_checksum
from fedlowrank.protocol import flower as wire
from strategies.registry import method_names, resolve_method
from strategies.strategy import build_strategy

LAYERS = ("m.layer.0.attention.query", "m.layer.0.attention.value", "m.layer.1.attention.query")
D, R, NUM_CLIENTS, TRAIN_SIZE = 24, 4, 8, 400


@pytest.fixture(autouse=True)
def _identity():
    from simulations.grids import adopt_server_identity

    adopt_server_identity()


def _initial_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    factors = {layer: LayerFactors(A=torch.randn(R, D, generator=generator), B=torch.zeros(D, R)) for layer in LAYERS}
    return {**factor_state(factors), "m.classifier.weight": torch.zeros(3, D), "m.classifier.bias": torch.zeros(3)}


def _strategy(method: str, initial: dict[str, torch.Tensor]):
    flat = {
        "strategy": method,
        "num-clients": NUM_CLIENTS,
        "lora.r": R,
        "server.max-update-norm": 50.0,
        "galore.rank": 2,
        "galore.projector": "gaussian",
        "optimizer": "galore" if method == "fed-galore" else "adamw",
    }
    config = RunConfig.from_flat(flat)
    return build_strategy(config, initial, resolve_method(config), max_examples=TRAIN_SIZE)


def _good(strategy, pid: int, generator: torch.Generator) -> TrainReply:
    probe = TrainReply(pid, 10, {}, 0.0, 1, 0.0)
    shapes = strategy.validator.expected_shapes(probe, strategy.global_state)
    state = {}
    for key, shape in shapes.items():
        base = strategy.global_state.get(key, torch.zeros(shape))
        state[key] = (base + 0.01 * torch.randn(shape, generator=generator)).float()
    checksum = a_checksum(strategy.global_state) if strategy.spec.check_shared_a else None
    return TrainReply(pid, 20 + pid, state, train_loss=1.0, num_steps=3, train_time=0.1, a_checksum=checksum)


def _message(content: RecordDict, node: int) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


def _tensor_mutations(reply: TrainReply, key: str) -> list[tuple[str, dict[str, torch.Tensor]]]:
    state, value = reply.state, reply.state[key]
    out = [
        ("missing key", {k: v for k, v in state.items() if k != key}),
        ("extra key", {**state, "m.intruder.weight": torch.zeros(2, 2)}),
        ("float64", {**state, key: value.double()}),
        ("NaN", {**state, key: value.clone().fill_(math.nan)}),
        ("Inf", {**state, key: torch.full_like(value, math.inf)}),
        ("huge update", {**state, key: value * 1e6 + 1e3}),
        ("transposed", {**state, key: value.T.contiguous() if value.dim() == 2 else value[:-1]}),
    ]
    if value.dim() == 2 and min(value.shape) == R:  # a factor: a rank-2 reply to a rank-R run
        out.append(("rank 2", {**state, key: value[:2] if value.shape[0] == R else value[:, :2]}))
    return out


def _malformed(reply: TrainReply, rng: random.Random) -> list[tuple[str, RecordDict]]:
    """(what is wrong, reply content) for one good reply: ~12 different ways to be broken."""
    key = rng.choice(sorted(reply.state))
    cases = [
        (why, wire.encode_reply(TrainReply(**{**reply.__dict__, "state": s})))
        for why, s in _tensor_mutations(reply, key)
    ]
    for why, field, value in (
        ("negative count", wire.NUM_EXAMPLES, -150),
        ("impossible count", wire.NUM_EXAMPLES, 1e12),
        ("NaN count", wire.NUM_EXAMPLES, math.nan),
        ("partition out of range", wire.PARTITION_ID, NUM_CLIENTS + 3),
        ("NaN loss", wire.TRAIN_LOSS, math.nan),
    ):
        content = wire.encode_reply(reply)
        content[wire.METRICS][field] = value
        cases.append((why, content))
    for dtype in (np.float16, np.int64):  # what a client not using our encoder could send
        other = wire.encode_reply(reply)
        other[wire.ARRAYS][key] = Array(reply.state[key].numpy().astype(dtype))
        cases.append((f"{np.dtype(dtype).name} array", other))
    truncated = wire.encode_reply(reply)
    array = truncated[wire.ARRAYS][key]
    truncated[wire.ARRAYS][key] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-7])
    cases.append(("truncated array", truncated))
    no_arrays = wire.encode_reply(reply)
    del no_arrays[wire.ARRAYS]
    cases.append(("no arrays record", no_arrays))
    no_metrics = wire.encode_reply(reply)
    del no_metrics[wire.METRICS]
    cases.append(("no metrics record", no_metrics))
    if reply.a_checksum is not None:
        cases.append(("another A", wire.encode_reply(TrainReply(**{**reply.__dict__, "a_checksum": "0" * 64}))))
    return cases


@pytest.mark.parametrize(
    "method", ["fedit", "fedsa", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora", "fed-galore"]
)
def test_fuzzed_replies_are_rejected_and_good_ones_kept(method):
    assert method in method_names()
    generator, rng = torch.Generator().manual_seed(hash(method) % 2**31), random.Random(method)
    strategy = _strategy(method, _initial_state(generator))
    rejected_total = 0
    for server_round in (1, 2):
        goods = [_good(strategy, pid, generator) for pid in range(3)]
        bad = [case for reply in goods for case in _malformed(reply, rng)]
        messages = [(f"good-{g.partition_id}", _message(wire.encode_reply(g), 100 + g.partition_id)) for g in goods]
        messages += [(why, _message(content, 200 + i)) for i, (why, content) in enumerate(bad)]
        rng.shuffle(messages)
        result = strategy.train_round(server_round, [m for _, m in messages])
        assert sorted(r.partition_id for r in result.accepted) == [0, 1, 2], (method, result.rejected)
        # every bad reply is rejected, each with a reason (a malformed one under its node, others by partition)
        assert len(result.rejected) == len(bad) and all(result.rejected.values())
        rejected_total += len(bad)
        assert result.arrays is not None and not result.kept_previous
        assert all(bool(torch.isfinite(v).all()) for v in strategy.global_state.values())
        assert all(bool(torch.isfinite(v).all()) for v in strategy.folded.values())
    assert rejected_total >= 2 * 3 * 12


def test_the_fuzzer_covers_more_than_two_hundred_bad_replies():
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    count = 0
    for method in ("fedit", "fedsa", "ffa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora", "fed-galore"):
        strategy = _strategy(method, _initial_state(generator))
        count += sum(len(_malformed(_good(strategy, pid, generator), rng)) for pid in range(3)) * 2
    assert count >= 200, count


def test_too_few_valid_replies_keep_the_previous_model():
    generator = torch.Generator().manual_seed(1)
    initial = _initial_state(generator)
    config = RunConfig.from_flat({"num-clients": NUM_CLIENTS, "lora.r": R, "server.min-valid-replies": 2})
    strategy = build_strategy(config, initial, resolve_method(config), max_examples=TRAIN_SIZE)
    good = _good(strategy, 0, generator)
    broken = TrainReply(**{**_good(strategy, 1, generator).__dict__, "train_loss": math.inf})
    result = strategy.train_round(1, [_message(wire.encode_reply(r), 10 + i) for i, r in enumerate((good, broken))])
    assert "min-valid-replies=2" in result.kept_previous and result.arrays is not None
    assert all(torch.equal(strategy.global_state[k], initial[k]) for k in initial)  # nothing moved
    assert np.isfinite(result.record()["clients_rejected"])


def test_non_finite_keys_names_every_bad_tensor_whatever_the_dtypes():
    from fedlowrank.factors import non_finite_keys

    finite = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float64), "n": torch.arange(3)}
    assert non_finite_keys(finite) == [] and non_finite_keys({}) == []
    bad = {**finite, "c": torch.tensor([1.0, float("nan")]), "d": torch.tensor([float("-inf")], dtype=torch.float64)}
    assert non_finite_keys(bad) == ["c", "d"]


def test_finiteness_is_checked_through_shared_copies_and_exactly_per_tensor():
    """``all_finite`` checks views through the tensor they view (a batched wave's states are rows of a few
    copies), once; a NaN anywhere in that tensor says "not all finite", and ``non_finite_keys`` then names
    exactly the tensors that hold one: not a row whose neighbour does."""
    from fedlowrank.factors import all_finite, non_finite_keys

    stacked = torch.randn(4, 3, 5)
    rows = dict(zip("abcd", stacked.unbind(0), strict=True))
    assert all_finite(rows.values()) and non_finite_keys(rows) == []
    stacked[2, 1, 4] = float("nan")
    assert not all_finite(rows.values()) and non_finite_keys(rows) == ["c"]
    first_two = {key: rows[key] for key in "ab"}  # their copy holds a NaN, they do not
    assert not all_finite(first_two.values()) and non_finite_keys(first_two) == []
    mixed = {
        "x": torch.ones(2, dtype=torch.float64),
        "y": torch.tensor([1.0, -math.inf]),
        "z": torch.ones(3).bfloat16(),
    }
    assert non_finite_keys(mixed) == ["y"] and all_finite([]) and all_finite([torch.arange(3)])


def test_a_rounds_replies_read_together_are_each_what_it_reads_alone(tmp_path):
    """``decode_train_replies`` reads a round's tensors into stacked copies: each reply is exactly what
    ``decode_train_reply`` gives (tensors, fields), a malformed one gives its error in its place, a reply with
    a NaN is the one marked not finite (and the validator rejects it), arrays the fast path does not take
    (Fortran order, other shapes) read alone, and the rows save to a checkpoint like any tensors."""
    from fedlowrank.checkpoint import load_checkpoint, save_checkpoint
    from fedlowrank.protocol import Refusal

    generator = torch.Generator().manual_seed(3)
    strategy = _strategy("fedit", _initial_state(generator))
    goods = [_good(strategy, pid, generator) for pid in range(5)]
    contents = [wire.encode_reply(reply) for reply in goods]
    key = sorted(goods[0].state)[0]
    with_nan = TrainReply(**{**goods[1].__dict__, "state": {**goods[1].state, key: goods[1].state[key].clone()}})
    with_nan.state[key].view(-1)[0] = math.nan
    contents[1] = wire.encode_reply(with_nan)
    fortran = np.asfortranarray(goods[2].state[key].numpy())
    contents[2][wire.ARRAYS][key] = Array(fortran)  # Flower's reader: not the stacked pass
    contents[3][wire.ARRAYS][key] = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=b"\x93NUMPY")
    # the first reply's array of another key is unreadable: it fails alone, the others of its key read together
    other = sorted(goods[0].state)[1]
    shape = tuple(goods[0].state[other].shape)
    contents[0][wire.ARRAYS][other] = wire._new_array("float32", shape, "numpy.ndarray", None)  # type: ignore[arg-type]
    contents.append(wire.encode_reply(Refusal(7, "budget spent", 3.0)))
    together = wire.decode_train_replies(contents)
    for content, read in zip(contents, together, strict=True):
        try:
            alone = wire.decode_train_reply(content)
        except wire.MalformedMessage as exc:
            assert isinstance(read, wire.MalformedMessage) and str(read) == str(exc)
            continue
        if isinstance(alone, Refusal):
            assert read == alone
            continue
        assert {k: v for k, v in vars(read).items() if k not in ("state", "state_finite")} == {
            k: v for k, v in vars(alone).items() if k not in ("state", "state_finite")
        }
        assert sorted(read.state) == sorted(alone.state)
        for k, value in alone.state.items():
            torch.testing.assert_close(read.state[k], value, rtol=0, atol=0, equal_nan=True)
    assert isinstance(together[0], wire.MalformedMessage) and isinstance(together[3], wire.MalformedMessage)
    assert [r.state_finite for r in together if isinstance(r, TrainReply)] == [False, True, True]
    assert strategy.validator.reason(together[1], strategy.global_state).startswith("1 tensor(s) hold NaN")
    assert all(strategy.validator.reason(together[i], strategy.global_state) is None for i in (2, 4))
    rows = {f"{i}/{k}": v for i in (2, 4) for k, v in together[i].state.items()}
    assert rows[f"2/{other}"]._base is rows[f"4/{other}"]._base is not None  # rows of one stacked copy
    save_checkpoint(tmp_path, rows, {"round": 1})
    loaded, _ = load_checkpoint(tmp_path)
    assert all(torch.equal(loaded[k], v) for k, v in rows.items())
