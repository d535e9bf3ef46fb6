"""``LoRAStrategy``: the Flower shell around a pure per-layer aggregation function.

A method supplies ``aggregate(client_factors, weights) -> {layer: LayerFactors}``; this class turns Flower
replies into ``{layer: (A, B)}`` factors, weights the clients, averages non-LoRA trainables (the head)
and turns the result back into the global ``ArrayRecord``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedlowrank.adapters import LayerFactors, extra_keys, factor_keys, lora_factors
from strategies.fedit import weighted_average
from strategies.records import record_to_state, state_to_record

AggregateFn = Callable[[Sequence[dict[str, LayerFactors]], torch.Tensor], dict[str, LayerFactors]]

NUM_EXAMPLES = "num-examples"


def client_weights(num_examples: Sequence[int | float], weighting: str = "num-examples") -> torch.Tensor:
    """p_k = n_k / sum n ("num-examples") or 1/K ("uniform"), in float64."""
    counts = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if weighting == "uniform":
        return torch.full_like(counts, 1.0 / len(counts))
    if weighting != "num-examples":
        raise ValueError(f"unknown weighting {weighting!r}")
    if counts.sum() <= 0:
        raise ValueError("all clients reported zero examples; cannot weight by example count")
    return counts / counts.sum()


def compose_state(factors: dict[str, LayerFactors], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for layer, pair in factors.items():
        key_a, key_b = factor_keys(layer)
        state[key_a], state[key_b] = pair.A, pair.B
    state.update(extras)
    return state


class LoRAStrategy(FedAvg):
    """FedAvg's sampling and message plumbing with a LoRA-aware aggregation step."""

    method_name = "lora"

    def __init__(self, aggregate_fn: AggregateFn, weighting: str = "num-examples", **fedavg_kwargs) -> None:
        super().__init__(weighted_by_key=NUM_EXAMPLES, **fedavg_kwargs)
        self.aggregate_fn = aggregate_fn
        self.weighting = weighting

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _errors = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        states = [record_to_state(content[self.arrayrecord_key]) for content in contents]
        counts = [_metric(content, NUM_EXAMPLES) for content in contents]
        weights = client_weights(counts, self.weighting)
        factors = self.aggregate_fn([lora_factors(state) for state in states], weights)
        extras = {key: weighted_average([s[key] for s in states], weights) for key in extra_keys(states[0])}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return state_to_record(compose_state(factors, extras)), metrics


def _metric(content, key: str) -> float:
    for record in content.metric_records.values():
        if key in record:
            return float(record[key])
    raise KeyError(f"reply has no metric {key!r}")
