"""The protocol on Flower's wire: instructions and replies as ``RecordDict`` s, tensors as ``ArrayRecord`` s.

The only module of ``fedlowrank/`` that imports Flower. Tensors travel in fp32 (Flower's arrays go through
numpy, which has no bfloat16); float64 stays float64 (accountant histories in client state must not lose
precision). Keys are sorted: Flower's DP wrappers pair reply and broadcast arrays by position.
"""

from __future__ import annotations

import functools
import io
import math
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedlowrank.protocol.messages import (
    EvaluateInstruction,
    EvaluateReply,
    MalformedMessage,
    MethodSpec,
    PrivacyReport,
    Refusal,
    TrainInstruction,
    TrainReply,
    check_run_key,
)

# Record names inside a message's content.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CLIENT_INFO = "client-info"
REFUSAL = "refusal"

# Instruction fields (ConfigRecord); "server-round" is the name Flower's own strategies use.
SERVER_ROUND = "server-round"
SEED = "seed"
TEST_SET = "eval-global-test"
RUN_KEY = "run-key"
TRAINED_BEFORE = "trained-before"  # a bitmap of client ids (bit k of byte k // 8, least significant first)
SPEC_FIELDS = {  # MethodSpec field -> wire key (sides as comma-separated text)
    "trainer": "trainer",
    "train": "train",
    "upload": "upload",
    "download": "download",
    "local_b": "local-b",
    "local_head": "local-head",
    "check_shared_a": "check-shared-a",
    "heterogeneous_ranks": "heterogeneous-ranks",
}
SIDE_FIELDS = ("train", "upload", "download")

# Reply fields (MetricRecord / ConfigRecord).
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
NUM_STEPS = "num-steps"
TRAIN_TIME = "train-time"
A_CHECKSUM = "a-checksum"
REFUSED = "dp-refused"
REASON = "reason"
EPSILON = "dp-epsilon"
PRIVACY_FIELDS = {  # PrivacyReport field -> wire key
    "epsilon": EPSILON,
    "noise_multiplier": "dp-noise-multiplier",
    "sample_rate": "dp-sample-rate",
    "steps_total": "dp-steps-total",
    "empty_batches": "dp-empty-batches",
    "planned_rounds": "dp-planned-rounds",
}
EVAL_FIELDS = {"loss": "eval-loss", "accuracy": "eval-accuracy", "f1": "eval-f1"}
PERSONALIZATION_GAP = "personalization-gap"
TEST_PREFIX = "test-"


# ---- tensors -------------------------------------------------------------------------------------------------
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def state_to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    for key in state:
        if not isinstance(key, str):
            raise TypeError(f"state keys must be text, not {type(key).__name__} ({key!r})")
    return _array_record({key: _tensor_to_array(state[key]) for key in sorted(state)})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: _array_to_tensor(array) for key, array in record.items()}


def record_bytes(record: ArrayRecord | None) -> int:
    """Bytes as serialized in the message (array payloads plus their keys), as Flower's ``count_bytes`` counts
    them, from the record's dict (``_plain``: its items view costs ≈1 µs an array, for every message)."""
    return 0 if record is None else sum(len(array.data) + len(key) for key, array in _plain(record).items())


def message_arrays(message: Message) -> ArrayRecord | None:
    """The message's tensors (None for an error reply or a reply without any)."""
    if message.has_error():
        return None
    return _part(message.content, ARRAYS, ArrayRecord)


# (dtype, shape) of a tensor on the wire -> its .npy header, numpy's dtype name and the shape as a tuple
_NPY_HEADERS: dict[tuple[torch.dtype, torch.Size], tuple[bytes, str, tuple[int, ...]]] = {}
_WIRE_DTYPES = (torch.float32, torch.float64)


def _tensor_to_array(tensor: torch.Tensor) -> Array:
    """The Array Flower's ``Array(ndarray)`` builds (the same .npy bytes) of the tensor on the CPU in its wire dtype,
    with the header, dtype name and shape cached per dtype and shape: ``np.save`` formats the header anew for every
    array (≈0.09 ms each), and even reading numpy's dtype name back costs 1 µs (ten arrays a reply, hundreds of
    replies a round: ≈5 against ≈2.5 µs an array so)."""
    if not (tensor.is_cpu and tensor.dtype in _WIRE_DTYPES and not tensor.requires_grad):
        tensor = tensor.detach().to("cpu", _wire_dtype(tensor))
    values = tensor.contiguous().numpy()
    key = (tensor.dtype, tensor.shape)
    cached = _NPY_HEADERS.get(key)
    if cached is None:
        buffer = io.BytesIO()
        fields = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False, "shape": values.shape}
        np.lib.format.write_array_header_1_0(buffer, fields)
        cached = _NPY_HEADERS[key] = (buffer.getvalue(), str(values.dtype), tuple(values.shape))
    header, dtype, shape = cached
    return _new_array(dtype, shape, "numpy.ndarray", header + values.tobytes())


def _fast_array_is_faithful() -> bool:
    """Whether an Array given its four public fields directly equals one from Flower's constructor (its argument
    dispatch and per-field hooks cost ≈20 µs an array, two thirds of a small reply's encoding). Checked once
    against the installed Flower (fields, dirty flag, content id): if a release gives Array more state, the
    constructor is used."""
    probe = {"dtype": "float32", "shape": (1,), "stype": "numpy.ndarray", "data": b"\x00" * 4}
    built = Array.__new__(Array)
    vars(built).update(probe)
    reference = Array(**probe)
    same_fields = all(getattr(built, name) == value for name, value in probe.items())
    return same_fields and built.is_dirty == reference.is_dirty and built.object_id == reference.object_id


if _fast_array_is_faithful():

    def _new_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
        array = Array.__new__(Array)
        vars(array).update(dtype=dtype, shape=shape, stype=stype, data=data)
        return array

else:  # pragma: no cover - a Flower whose Array holds more than its four fields

    def _new_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
        return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _filled(record: Any, items: dict[str, Any]) -> Any:
    """``record`` (an empty ArrayRecord, MetricRecord or RecordDict) holding ``items`` without a ``__setitem__``
    per item: Flower's typed dict re-checks key and value there and builds two typing aliases each time (≈4 µs an
    item: ten arrays and five metrics a reply, hundreds of replies a round), and RecordDict's looks the key up
    through a raised KeyError (≈5 µs). The callers check the items (text keys, ``Array`` s; plain int and float
    metrics; records); where the installed Flower's records hold more state than these
    items, ``_FILLS_FAITHFULLY`` is false and every record is filled item by item."""
    vars(record)["_data"].update(items)
    if isinstance(record, ArrayRecord):
        record.is_dirty = True  # what __setitem__ marks: changed since last serialized
    return record


def _fills_faithfully() -> bool:
    """Whether ``_filled`` gives, with the installed Flower, the records its constructors give for the same
    items: the same attributes, items in order, dirty flag and content id."""
    arrays = {"b": _new_array("float32", (1,), "numpy.ndarray", b"\x00" * 4)}
    arrays["a"] = _new_array("float32", (2,), "numpy.ndarray", b"\x01" * 8)
    metrics = {"n": 3, "loss": 0.5}
    keyed_arrays = ArrayRecord()
    for key, array in arrays.items():
        keyed_arrays[key] = array
    records = {"arrays": keyed_arrays, "metrics": MetricRecord(metrics)}
    pairs = (
        (_filled(ArrayRecord(), arrays), keyed_arrays),
        (_filled(MetricRecord(), metrics), MetricRecord(metrics)),
        (_filled(RecordDict(), records), RecordDict(records)),
    )
    for built, reference in pairs:
        state, reference_state = (
            {k: v for k, v in vars(record).items() if k != "_data"} for record in (built, reference)
        )
        if state != reference_state or list(built.items()) != list(reference.items()):
            return False
        if isinstance(built, ArrayRecord) and not built.is_dirty:
            return False
        if built.object_id != reference.object_id:
            return False
    return True


_FILLS_FAITHFULLY = _fills_faithfully()


def _array_record(arrays: dict[str, Array]) -> ArrayRecord:
    if _FILLS_FAITHFULLY:
        return _filled(ArrayRecord(), arrays)
    record = ArrayRecord()  # key by key: ArrayRecord(dict) would copy every Array once more
    for key, array in arrays.items():
        record[key] = array
    return record


def _record_dict(records: dict[str, ArrayRecord | MetricRecord | ConfigRecord]) -> RecordDict:
    """A message's content of the records the callers built (text keys, Flower's record types)."""
    return _filled(RecordDict(), records) if _FILLS_FAITHFULLY else RecordDict(records)


def _metric_record(metrics: dict[str, Any]) -> MetricRecord:
    """Plain int and float values (not bool, not numpy scalars: those take Flower's own checks) fill directly."""
    if _FILLS_FAITHFULLY and all(type(k) is str and type(v) in (int, float) for k, v in metrics.items()):
        return _filled(MetricRecord(), metrics)
    return MetricRecord(metrics)


def _wire_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _array_to_tensor(array: Array) -> torch.Tensor:
    """Flower's ``Array.numpy()`` re-parses the .npy header with ``np.load`` (≈0.15 ms per array, most of a
    round's record handling with hundreds of clients); read the payload after the header directly
    (``_npy_header_size``). Anything unusual (Fortran order, another serialization, a size mismatch) goes through
    Flower's own reader, and what that cannot read either is a malformed message."""
    header = _npy_header_size(array)
    try:
        if header is not None:
            values = np.frombuffer(array.data, dtype=_numeric_dtype(array.dtype), offset=header)
            # a copy in torch's 64-byte aligned memory, not numpy's 16-byte aligned one that lands differently from
            # run to run: BLAS may sum in another order on another alignment (as in ``records_to_states``)
            return torch.tensor(values.reshape(array.shape))
        return torch.tensor(array.numpy())  # Flower's reader (never unpickles)
    except Exception as exc:  # truncated payloads, unknown dtypes: say so instead of crashing the round
        raise MalformedMessage(f"unreadable array ({type(exc).__name__}: {exc})") from exc


# (dtype, shape) -> the C-order .npy header an array of them was last sent with, and its payload's size
_C_ORDER_HEADERS: dict[tuple[str, tuple[int, ...]], tuple[bytes, int]] = {}


@functools.lru_cache(maxsize=64)
def _numeric_dtype(name: str) -> np.dtype:
    try:
        dtype = np.dtype(name)
    except Exception as exc:
        raise MalformedMessage(f"unreadable array (unknown dtype {name!r}: {exc})") from exc
    if dtype.kind not in NUMERIC_KINDS:  # object arrays would need pickle: never
        raise MalformedMessage(f"arrays of dtype {name!r} are not accepted (numbers only)")
    return dtype


def _npy_header_size(array: Array) -> int | None:
    """The size of a C-order .npy array's header, where exactly as many bytes as its shape and dtype say follow
    it; None for anything else (Flower's reader then decides). Raises ``MalformedMessage`` for a
    dtype that is not a number. A header seen before for the same dtype and shape is recognised by comparing
    bytes (parsing each cost ≈5 µs an array, ten arrays a reply, hundreds of replies a round)."""
    dtype = _numeric_dtype(array.dtype)
    try:
        data, shape = array.data, tuple(array.shape)
        if array.stype != "numpy.ndarray":
            return None
        known = _C_ORDER_HEADERS.get((array.dtype, shape))
        if known is not None and len(data) == len(known[0]) + known[1] and data.startswith(known[0]):
            return len(known[0])
        if data[:6] != b"\x93NUMPY" or data[6:7] not in (b"\x01", b"\x02", b"\x03"):
            return None
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
        payload_size = math.prod(shape) * dtype.itemsize
        if len(data) - start != payload_size or b"'fortran_order': False" not in data[:start]:
            return None
        if len(_C_ORDER_HEADERS) < 4096:  # one per dtype and shape in practice; bounded whatever is sent
            _C_ORDER_HEADERS[(array.dtype, shape)] = (bytes(data[:start]), payload_size)
        return start
    except Exception as exc:  # a shape or payload of the wrong kind: malformed, not a crash
        raise MalformedMessage(f"unreadable array ({type(exc).__name__}: {exc})") from exc


def _plain(record: Any) -> Mapping[str, Any]:
    """A record's (or a content's) items as a plain mapping, read from its dict where ``_filled`` fills it: Flower's
    typed dict looks each key up through ``__getitem__`` and answers a missing key by raising ``KeyError``
    (≈1 µs an item read, ≈3 µs a key missing; ten arrays, five metrics and three parts a reply)."""
    return vars(record)["_data"] if _FILLS_FAITHFULLY else record


def records_to_states(
    records: list[ArrayRecord | None],
) -> list[tuple[dict[str, torch.Tensor], bool] | MalformedMessage | None]:
    """Each record's tensors (``record_to_state``) and whether all of them are finite; None where the record is
    None, a ``MalformedMessage`` where it cannot be read. The arrays that share key, dtype and shape across the
    records (a round's replies of one method) are read in one pass into one stacked tensor, each record's
    tensor a row of it, and checked finite in the same pass. Why: reading each reply's tensors and checking
    them finite one reply at a time cost 0.12-0.23 ms a reply, against 0.06-0.09 ms so (512 replies of ten
    small tensors, 2-core CPU)."""
    states: list[dict[str, torch.Tensor] | None] = [None if record is None else {} for record in records]
    finite = [True] * len(records)
    failed: dict[int, MalformedMessage] = {}
    groups: dict[tuple[str, str, str, tuple[int, ...]], list[tuple[int, Array]]] = {}
    for index, record in enumerate(records):
        if record is None:
            continue
        try:
            for key, array in _plain(record).items():
                groups.setdefault((key, array.dtype, array.stype, tuple(array.shape)), []).append((index, array))
        except Exception as exc:  # a record or shape of the wrong kind: malformed, not a crash
            failed[index] = MalformedMessage(f"unreadable array ({type(exc).__name__}: {exc})")
    for (key, dtype, _, shape), members in groups.items():
        members = [(index, array) for index, array in members if index not in failed]
        if not members:
            continue
        # the group's arrays whose bytes start with the first readable one's C-order .npy header and are as long:
        # read together, after one header check for all; any other, alone (Flower's reader, where need be)
        header, alone, together = None, members, []
        for _, array in members:
            try:
                header = _npy_header_size(array)
            except MalformedMessage:
                continue  # this one fails alone, below
            if header is not None:
                prefix, size = array.data[:header], len(array.data)
                datas = [a.data for _, a in members]
                alike = [type(d) is bytes and len(d) == size and d.startswith(prefix) for d in datas]
                together = [(i, d) for (i, _), d, same in zip(members, datas, alike, strict=True) if same]
                alone = [member for member, same in zip(members, alike, strict=True) if not same]
                break
        for index, array in alone:
            try:
                tensor = states[index][key] = _array_to_tensor(array)  # type: ignore[index]
            except MalformedMessage as exc:
                failed[index] = exc
                continue
            finite[index] = finite[index] and bool(tensor.isfinite().all())
        if not together:
            continue
        # the records' whole arrays end to end, each one's values a row after its header, copied once into rows
        # that each start on a 64-byte boundary (torch's CPU alignment), as a tensor of its own would: BLAS and
        # LAPACK may sum in another order on other alignments, and results must not depend on where rows land
        payloads = np.frombuffer(b"".join(data for _, data in together), dtype=np.uint8)
        payloads = payloads.reshape(len(together), -1)[:, header:]
        stride = max(64, -(-payloads.shape[1] // 64) * 64)
        rows_memory = torch.empty((len(together), stride), dtype=torch.uint8)
        aligned = rows_memory.numpy()[:, : payloads.shape[1]]
        aligned[...] = payloads
        values = aligned.view(dtype).reshape(len(together), *shape)
        if values.dtype.kind == "f":
            rows_finite = np.isfinite(values.reshape(len(together), -1)).all(axis=1).tolist()
        else:
            rows_finite = [True] * len(together)
        rows = torch.from_numpy(values).unbind(0)
        for (index, _), tensor, row_finite in zip(together, rows, rows_finite, strict=True):
            states[index][key] = tensor  # type: ignore[index]
            finite[index] = finite[index] and row_finite
    return [
        failed[index] if index in failed else None if state is None else (state, finite[index])
        for index, state in enumerate(states)
    ]


# ---- instructions --------------------------------------------------------------------------------------------
def _spec_record(spec: MethodSpec) -> dict[str, Any]:
    record = {wire: getattr(spec, name) for name, wire in SPEC_FIELDS.items()}
    record.update({name: ",".join(getattr(spec, name)) for name in SIDE_FIELDS})
    return record


def _spec_from(record: ConfigRecord) -> MethodSpec:
    values = {name: record[wire] for name, wire in SPEC_FIELDS.items() if wire in record}
    values.update({name: tuple(filter(None, str(values[name]).split(","))) for name in SIDE_FIELDS if name in values})
    try:
        return MethodSpec(**values)
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"bad method spec in the instruction: {exc}") from exc


def encode_instruction(
    instruction: TrainInstruction | EvaluateInstruction, arrays: ArrayRecord | None = None
) -> RecordDict:
    """``arrays``: the broadcast already encoded (one record shared by every message of a round)."""
    config = {SERVER_ROUND: instruction.server_round, **_spec_record(instruction.spec)}
    if isinstance(instruction, TrainInstruction):
        config[SEED] = instruction.seed
    else:
        config[TEST_SET] = instruction.test_set
    if instruction.run_key:
        config[RUN_KEY] = instruction.run_key
    if instruction.trained_before:
        config[TRAINED_BEFORE] = encode_client_set(instruction.trained_before)
    arrays = arrays if arrays is not None else state_to_record(instruction.state)
    return RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)})


def decode_train_instruction(content: RecordDict) -> TrainInstruction:
    config, spec, state = _instruction_parts(content)
    seed = int(config.get(SEED, 0))
    return TrainInstruction(int(config[SERVER_ROUND]), spec, state, seed=seed, **run_fields(config))


def decode_evaluate_instruction(content: RecordDict) -> EvaluateInstruction:
    config, spec, state = _instruction_parts(content)
    test_set = bool(config.get(TEST_SET, False))
    return EvaluateInstruction(int(config[SERVER_ROUND]), spec, state, test_set=test_set, **run_fields(config))


def run_fields(config: ConfigRecord) -> dict[str, Any]:
    """An instruction's run-wide fields from its config record: the run key (one plain folder name) and the
    clients that trained before; ``MalformedMessage`` for either in another form."""
    try:
        run_key = check_run_key(str(config.get(RUN_KEY, "")))
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from exc
    return {"run_key": run_key, "trained_before": decode_client_set(config.get(TRAINED_BEFORE, b""))}


def encode_client_set(clients: Iterable[int]) -> bytes:
    """Client ids as a bitmap: 10,000 clients in 1,250 bytes."""
    ids = np.fromiter(clients, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("client ids must not be negative")
    bits = np.zeros(int(ids.max()) + 1 if ids.size else 0, dtype=bool)
    bits[ids] = True
    return np.packbits(bits, bitorder="little").tobytes()


def decode_client_set(data: Any) -> frozenset[int]:
    if not isinstance(data, bytes):
        raise MalformedMessage(f"{TRAINED_BEFORE!r} must be bytes (a bitmap of client ids), not {type(data).__name__}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    return frozenset(np.flatnonzero(bits).tolist())


def _instruction_parts(content: RecordDict) -> tuple[ConfigRecord, MethodSpec, dict[str, torch.Tensor]]:
    config = _part(content, CONFIG, ConfigRecord)
    if config is None or SERVER_ROUND not in config:
        raise MalformedMessage(f"an instruction needs a {CONFIG!r} record with {SERVER_ROUND!r}")
    record = _part(content, ARRAYS, ArrayRecord)
    return config, _spec_from(config), {} if record is None else record_to_state(record)


# ---- replies ---------------------------------------------------------------------------------------------------
def encode_reply(reply: TrainReply | Refusal | EvaluateReply) -> RecordDict:
    if isinstance(reply, Refusal):
        metrics = {NUM_EXAMPLES: 0, PARTITION_ID: reply.partition_id, REFUSED: 1, EPSILON: reply.epsilon}
        return _record_dict({METRICS: _metric_record(metrics), REFUSAL: ConfigRecord({REASON: reply.reason})})
    if isinstance(reply, EvaluateReply):
        metrics = {NUM_EXAMPLES: reply.num_examples, PARTITION_ID: reply.partition_id}
        metrics.update({wire: getattr(reply, name) for name, wire in EVAL_FIELDS.items()})
        if reply.personalization_gap is not None:
            metrics[PERSONALIZATION_GAP] = reply.personalization_gap
        metrics.update({f"{TEST_PREFIX}{name}": value for name, value in reply.test.items()})
        return _record_dict({METRICS: _metric_record(metrics)})
    metrics = {
        NUM_EXAMPLES: reply.num_examples,
        TRAIN_LOSS: reply.train_loss,
        NUM_STEPS: reply.num_steps,
        TRAIN_TIME: reply.train_time,
        PARTITION_ID: reply.partition_id,
    }
    if reply.privacy is not None:
        metrics.update({wire: getattr(reply.privacy, name) for name, wire in PRIVACY_FIELDS.items()})
        metrics[REFUSED] = 0
    content = _record_dict({ARRAYS: state_to_record(reply.state), METRICS: _metric_record(metrics)})
    if reply.a_checksum is not None:
        content[CLIENT_INFO] = ConfigRecord({A_CHECKSUM: reply.a_checksum})
    return content


def error_reply(message: Message, exc: BaseException) -> Message:
    """What Flower makes of a ClientApp that raised: an error reply with the reason and where it arose."""
    trace = "".join(traceback.format_exception(exc, limit=3))
    reason = f"{type(exc).__name__}: {exc}\n{trace}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def decode_train_reply(content: RecordDict) -> TrainReply | Refusal:
    """A client's train reply; ``MalformedMessage`` says what is wrong with one that does not parse."""
    return _train_reply(content, None)


def decode_train_replies(contents: list[RecordDict]) -> list[TrainReply | Refusal | MalformedMessage]:
    """A round's train replies, each as ``decode_train_reply`` gives it (a malformed one: its
    ``MalformedMessage`` in its place), their tensors read together (``records_to_states``: each reply's
    ``state_finite`` says whether its tensors were all finite)."""
    states = records_to_states([_part(content, ARRAYS, ArrayRecord) for content in contents])
    replies: list[TrainReply | Refusal | MalformedMessage] = []
    for content, state in zip(contents, states, strict=True):
        try:
            replies.append(_train_reply(content, state))
        except MalformedMessage as exc:
            replies.append(exc)
    return replies


def _train_reply(
    content: RecordDict, read: tuple[dict[str, torch.Tensor], bool] | MalformedMessage | None
) -> TrainReply | Refusal:
    """``read``: the reply's tensors already read (``records_to_states``); None: read them here."""
    metrics = _metrics(content)
    partition = _integer(metrics, PARTITION_ID)
    if float(metrics.get(REFUSED, 0)) > 0:
        reason = (_part(content, REFUSAL, ConfigRecord) or {}).get(REASON, "privacy budget spent")
        return Refusal(partition, str(reason), _number(metrics, EPSILON))
    arrays = _part(content, ARRAYS, ArrayRecord)
    if arrays is None:
        raise MalformedMessage(f"a train reply needs an {ARRAYS!r} record")
    if isinstance(read, MalformedMessage):
        raise read
    state, state_finite = read if read is not None else (record_to_state(arrays), False)
    privacy = None
    if EPSILON in metrics:
        values = {name: _number(metrics, wire) for name, wire in PRIVACY_FIELDS.items()}
        for name in ("steps_total", "empty_batches", "planned_rounds"):
            values[name] = int(values[name])
        privacy = PrivacyReport(**values)
    info = _part(content, CLIENT_INFO, ConfigRecord)
    return TrainReply(
        partition_id=partition,
        num_examples=_integer(metrics, NUM_EXAMPLES),
        state=state,
        state_finite=state_finite,
        train_loss=_number(metrics, TRAIN_LOSS),
        num_steps=_integer(metrics, NUM_STEPS),
        train_time=_number(metrics, TRAIN_TIME),
        privacy=privacy,
        a_checksum=None if info is None or A_CHECKSUM not in info else str(info[A_CHECKSUM]),
    )


def decode_evaluate_reply(content: RecordDict) -> EvaluateReply:
    metrics = _metrics(content)
    gap = metrics.get(PERSONALIZATION_GAP)
    test = {k[len(TEST_PREFIX) :]: float(v) for k, v in metrics.items() if k.startswith(TEST_PREFIX)}
    return EvaluateReply(
        partition_id=_integer(metrics, PARTITION_ID),
        num_examples=_integer(metrics, NUM_EXAMPLES),
        personalization_gap=None if gap is None else float(gap),
        test=test,
        **{name: _number(metrics, wire) for name, wire in EVAL_FIELDS.items()},
    )


def _part(content: RecordDict, name: str, kind: type) -> Any:
    """The record ``name`` of a message's content when it is a ``kind``, else None (``content.array_records``
    and its kin copy every record of the content, with Flower's checks, on each access)."""
    record = _plain(content).get(name)
    return record if isinstance(record, kind) else None


def _metrics(content: RecordDict) -> Mapping[str, Any]:
    metrics = _part(content, METRICS, MetricRecord)
    if metrics is None:
        raise MalformedMessage(f"a reply needs a {METRICS!r} record")
    return _plain(metrics)


def _number(metrics: Mapping[str, Any], key: str) -> float:
    if key not in metrics:
        raise MalformedMessage(f"the reply has no {key!r}")
    value = metrics[key]
    if isinstance(value, list | bool):
        raise MalformedMessage(f"{key!r} must be a number, got {value!r}")
    return float(value)


def _integer(metrics: Mapping[str, Any], key: str) -> int:
    value = _number(metrics, key)
    if not math.isfinite(value) or not value.is_integer():
        raise MalformedMessage(f"{key!r} must be a whole number, got {value!r}")
    return int(value)


# ---- cohorts: one message per node for the virtual clients it hosts --------------------------------------------
COHORT = "cohort"  # the ConfigRecord naming a cohort message's clients, and the handlers' action
COHORT_CLIENTS = "clients"
COHORT_ID = "cohort-id"
NUM_COHORTS = "num-cohorts"
NODE_SECONDS = "node-seconds"
CLIENT_ERROR = "client-error"
_MEMBER = "{client}/{name}"  # a member's record inside a cohort reply


def encode_cohort_instruction(content: RecordDict, clients: list[int]) -> RecordDict:
    """The instruction every listed client would get (one shared broadcast), addressed to their node."""
    cohort = RecordDict({name: record for name, record in content.items()})
    cohort[COHORT] = ConfigRecord({COHORT_CLIENTS: [int(c) for c in clients]})
    return cohort


def decode_cohort_instruction(content: RecordDict) -> tuple[RecordDict, list[int]]:
    """The per-client instruction and the clients it is for."""
    record = _part(content, COHORT, ConfigRecord)
    if record is None or COHORT_CLIENTS not in record:
        raise MalformedMessage(f"a cohort message needs a {COHORT!r} record listing its {COHORT_CLIENTS!r}")
    instruction = RecordDict({name: rec for name, rec in content.items() if name != COHORT})
    return instruction, [int(c) for c in record[COHORT_CLIENTS]]


def encode_cohort_replies(replies: dict[int, RecordDict | str], node_seconds: float) -> RecordDict:
    """Each client's reply (or the reason it has none) under its own names, and the node's time for them all."""
    content = RecordDict({COHORT: ConfigRecord({COHORT_CLIENTS: sorted(replies), NODE_SECONDS: float(node_seconds)})})
    for client, reply in replies.items():
        if isinstance(reply, str):
            content[_MEMBER.format(client=client, name=CLIENT_ERROR)] = ConfigRecord({REASON: reply})
            continue
        for name, record in reply.items():
            content[_MEMBER.format(client=client, name=name)] = record
    return content


def decode_cohort_replies(content: RecordDict) -> tuple[dict[int, RecordDict | str], float]:
    """Each client's reply content (or the reason it has none), and the node's time."""
    record = _part(content, COHORT, ConfigRecord)
    if record is None or COHORT_CLIENTS not in record:
        raise MalformedMessage(f"a cohort reply needs a {COHORT!r} record listing its {COHORT_CLIENTS!r}")
    members: dict[int, RecordDict | str] = {int(c): RecordDict() for c in record[COHORT_CLIENTS]}
    for name, member_record in content.items():
        client, sep, inner = name.partition("/")
        if not sep:
            continue
        if not client.isdigit() or int(client) not in members:
            raise MalformedMessage(f"a cohort reply holds a record {name!r} for a client it does not list")
        if inner == CLIENT_ERROR:
            members[int(client)] = str(member_record.get(REASON, "no reason given"))
        elif isinstance(members[int(client)], RecordDict):
            members[int(client)][inner] = member_record  # type: ignore[index]
    return members, float(record.get(NODE_SECONDS, 0.0))


def clients_trained(reply: Message) -> int:
    """How many clients a train reply (or a client's failure) answers for: a cohort node's, all it trained."""
    kind = reply.metadata.message_type
    if kind != f"train.{COHORT}":
        return int(kind == "train")
    record = None if reply.has_error() else _part(reply.content, COHORT, ConfigRecord)
    return len(record.get(COHORT_CLIENTS, [])) if record is not None else 0


def encode_cohort_identity(cohort_id: int, num_cohorts: int) -> RecordDict:
    return RecordDict({COHORT: ConfigRecord({COHORT_ID: int(cohort_id), NUM_COHORTS: int(num_cohorts)})})


def decode_cohort_identity(content: RecordDict) -> tuple[int, int]:
    record = _part(content, COHORT, ConfigRecord)
    if record is None or COHORT_ID not in record or NUM_COHORTS not in record:
        raise MalformedMessage(f"a cohort node's identity needs {COHORT_ID!r} and {NUM_COHORTS!r}")
    return int(record[COHORT_ID]), int(record[NUM_COHORTS])
