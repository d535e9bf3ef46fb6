import pytest
import torch
from flwr.app import Message, RecordDict

from fedlowrank.adapters import LayerFactors
from fedlowrank.protocol import TrainReply
from fedlowrank.protocol.flower import encode_reply, record_to_state, state_to_record
from strategies.method import client_weights
from strategies.methods import fedit
from strategies.strategy import LoRAStrategy


def _random_clients(k=4, layers=("l0", "l1"), d_in=12, d_out=10, r=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            name: LayerFactors(
                A=torch.randn(r, d_in, generator=generator), B=torch.randn(d_out, r, generator=generator)
            )
            for name in layers
        }
        for _ in range(k)
    ]


def test_fedit_averages_each_factor_in_float64():
    clients = _random_clients()
    weights = client_weights([10, 30, 20, 40])
    result = fedit.average_factors(clients, weights)
    w = weights.tolist()
    for layer in ("l0", "l1"):
        ref_a = sum(w[k] * clients[k][layer].A.double() for k in range(4))
        ref_b = sum(w[k] * clients[k][layer].B.double() for k in range(4))
        torch.testing.assert_close(result[layer].A.double(), ref_a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result[layer].B.double(), ref_b, rtol=1e-6, atol=1e-7)


def test_fedit_product_differs_from_the_average_product_by_the_cross_covariance():
    clients = _random_clients(seed=1)
    weights = client_weights([1, 2, 3, 4])
    result = fedit.average_factors(clients, weights)["l0"]
    ideal = sum(w * c["l0"].B.double() @ c["l0"].A.double() for w, c in zip(weights, clients, strict=True))
    a_bar, b_bar = result.A.double(), result.B.double()
    gap = sum(
        w * (c["l0"].B.double() - b_bar) @ (c["l0"].A.double() - a_bar) for w, c in zip(weights, clients, strict=True)
    )
    torch.testing.assert_close(ideal - b_bar @ a_bar, gap, rtol=1e-5, atol=1e-5)
    assert gap.norm() > 0.1 * ideal.norm()  # independent clients: FedIT's bias is large


def test_client_weights():
    torch.testing.assert_close(client_weights([1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(client_weights([1, 3], "uniform"), torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="zero examples"):
        client_weights([0, 0])


def _reply(state, num_examples, node):
    instruction = Message(RecordDict(), dst_node_id=node, message_type="train")
    reply = TrainReply(node, num_examples, state, train_loss=float(node), num_steps=1, train_time=0.0)
    return Message(encode_reply(reply), reply_to=instruction)


@pytest.fixture(autouse=True)
def _task_identity():
    from simulations.grids import adopt_server_identity

    adopt_server_identity()


def test_flower_strategy_weights_by_examples_and_averages_the_head():
    clients = _random_clients(k=3)
    states = []
    for k, factors in enumerate(clients):
        state = {}
        for layer, pair in factors.items():
            state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"] = pair.A, pair.B
        state["classifier.weight"] = torch.full((2, 4), float(k))
        states.append(state)
    initial = {k: torch.zeros_like(v) for k, v in states[0].items()}
    strategy = LoRAStrategy.for_method("fedit", initial, scale=2.0)
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(s, n, i + 1) for i, (s, n) in enumerate(zip(states, [10, 20, 70], strict=True))]
    )
    merged = record_to_state(arrays)
    weights = [0.1, 0.2, 0.7]
    expected_a = sum(w * c["l1"].A for w, c in zip(weights, clients, strict=True))
    torch.testing.assert_close(merged["l1.lora_A.weight"], expected_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged["classifier.weight"], torch.full((2, 4), 0.2 + 1.4))
    assert metrics["train-loss"] == pytest.approx(0.1 * 1 + 0.2 * 2 + 0.7 * 3)
    uniform = LoRAStrategy.for_method("fedit", initial, scale=2.0, weighting="uniform")
    arrays, _ = uniform.aggregate_train(
        1, [_reply(s, n, i + 1) for i, (s, n) in enumerate(zip(states, [10, 20, 70], strict=True))]
    )
    torch.testing.assert_close(record_to_state(arrays)["classifier.weight"], torch.full((2, 4), 1.0))


def test_record_round_trip_reads_what_flower_reads():
    """The fast .npy payload reader gives Flower's own ``Array.numpy()`` values, dtypes and shapes, in torch's
    64-byte aligned memory (numpy's copies are 16-byte aligned and land differently from run to run: BLAS may
    sum in another order on another alignment)."""
    import numpy as np
    from flwr.app import Array

    generator = torch.Generator().manual_seed(0)
    state = {
        "a": torch.randn(3, 5, generator=generator),
        "b": torch.randn(7, generator=generator).double(),
        "c": torch.zeros(0, 4),
        "d": torch.tensor(2.5),
    }
    record = state_to_record(state)
    record["f"] = Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))  # Flower's fallback
    back = record_to_state(record)
    assert all(tensor.data_ptr() % 64 == 0 for tensor in back.values() if tensor.numel())
    for key, array in record.items():
        want = torch.from_numpy(array.numpy().copy())
        assert back[key].dtype == want.dtype and back[key].shape == want.shape and torch.equal(back[key], want), key
    for key in state:  # byte for byte what Flower's own Array(ndarray) writes: same fields, same content id
        reference = Array(state[key].numpy())
        assert record[key].data == reference.data and record[key] == reference, key
        assert record[key].object_id == reference.object_id and record[key].is_dirty == reference.is_dirty, key
    back["a"].add_(1.0)  # writable, and a copy: the record is unchanged
    assert torch.equal(record_to_state(record)["a"], state["a"])


def test_record_is_the_one_flower_fills_key_by_key():
    """``state_to_record`` fills the record's items at once: the record equals one Flower fills key by key
    (items in sorted order, dirty flag, content id, bytes counted), survives Flower's serialization, and a
    non-text key is refused as Flower's own check refuses it."""
    from flwr.app import Array, ArrayRecord

    from fedlowrank.protocol import flower as wire

    assert wire._FILLS_FAITHFULLY  # the installed Flower is the one the direct fill matches
    state = {"z.lora_B": torch.randn(4, 2), "a.lora_A": torch.randn(2, 4), "m.bias": torch.randn(3).double()}
    record = state_to_record(state)
    reference = ArrayRecord()
    for key in sorted(state):
        reference[key] = Array(state[key].numpy())
    assert list(record.keys()) == sorted(state) and record == reference
    assert record.is_dirty and record.count_bytes() == reference.count_bytes() == wire.record_bytes(reference)
    assert record.object_id == reference.object_id and not record.is_dirty  # deflating clears it, as for Flower's
    record["extra"] = Array(torch.ones(2).numpy())  # still a working ArrayRecord: adding marks it dirty again
    assert record.is_dirty and record.object_id != reference.object_id
    message = Message(RecordDict({"arrays": state_to_record(state)}), dst_node_id=1, message_type="train")
    assert message.content["arrays"].object_id == reference.object_id
    with pytest.raises(TypeError, match="text"):
        state_to_record({0: torch.ones(1)})


def test_reply_metrics_are_the_record_flower_builds_and_odd_values_take_flowers_checks():
    """A reply's metrics fill their record directly where every value is a plain int or float: the record
    equals Flower's own (items, content id); a numpy scalar goes through Flower's constructor (which accepts
    it), a bool is refused by Flower's check as before."""
    import numpy as np
    from flwr.app import MetricRecord

    from fedlowrank.protocol import flower as wire

    reply = TrainReply(
        partition_id=3, num_examples=8, state={"a": torch.ones(2)}, train_loss=0.25, num_steps=1, train_time=0.5
    )
    metrics = encode_reply(reply)["metrics"]
    plain = {key: value for key, value in metrics.items()}
    assert metrics == MetricRecord(plain) and metrics.object_id == MetricRecord(plain).object_id
    numpy_scalar = wire._metric_record({"loss": np.float64(0.5), "n": 2})
    assert numpy_scalar == MetricRecord({"loss": np.float64(0.5), "n": 2})
    with pytest.raises(TypeError, match="valid type"):
        wire._metric_record({"refused": True})
