"""``LoRAStrategy``: the Flower shell around a method's pure server math.

A method is two things (one file each in ``strategies/``):
- a ``MethodSpec``: what clients train, what goes up, what comes down, what stays on the client;
- ``server_update(RoundInput) -> ServerUpdate``: pure tensor math on ``{layer: LayerFactors(A, B)}``.

This class does the rest: it tells clients what to train, turns replies into factors (filling in the
factor a method does not upload from the global one), weights clients, averages the shared head, keeps
the global adapter and whatever was folded into the frozen weight, records the aggregation bias, and
builds the broadcast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlowrank.adapters import RESIDUAL_SUFFIX, LayerFactors, extra_keys, factor_state, key_role, lora_factors
from fedlowrank.lowrank import pad_rank
from fedlowrank.metrics import layer_bias, product, summarize
from strategies.common import (
    MethodSpec,
    RoundInput,
    ServerMath,
    ServerUpdate,
    a_checksum,
    client_weights,
    weighted_average,
)
from strategies.records import record_to_state, state_to_record
from strategies.user_dp import UserDP

log = logging.getLogger("fedlowrank")

NUM_EXAMPLES = "num-examples"
CLIENT_INFO = "client-info"
A_CHECKSUM = "a-checksum"

__all__ = ["LoRAStrategy", "MethodSpec", "RoundInput", "ServerUpdate", "client_weights", "weighted_average"]


class LoRAStrategy(FedAvg):
    """FedAvg's node sampling and message plumbing around a method's server math."""

    def __init__(
        self,
        spec: MethodSpec,
        server_math: ServerMath,
        initial_state: dict[str, torch.Tensor],
        scale: float,
        weighting: str = "num-examples",
        local_head: bool = False,
        user_dp: UserDP | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(weighted_by_key=NUM_EXAMPLES, **fedavg_kwargs)
        self.spec = spec
        self.server_math = server_math
        self.scale = scale
        self.weighting = weighting
        self.local_head = local_head and spec.local_b
        self.global_state = {k: v.clone() for k, v in initial_state.items()}
        self.folded: dict[str, torch.Tensor] = {}  # Σ of folded products per layer, float64
        self.round_info: dict[str, Any] = {}
        self.user_dp = user_dp

    # ---- what goes down ------------------------------------------------------------------------
    def global_factors(self) -> dict[str, LayerFactors]:
        return lora_factors(self.global_state)

    def global_model_state(self) -> dict[str, torch.Tensor]:
        """The full global adapter plus residual entries: what the server evaluates."""
        state = dict(self.global_state)
        state.update(self._residual_entries())
        return state

    def _residual_entries(self) -> dict[str, torch.Tensor]:
        return {f"{layer}{RESIDUAL_SUFFIX}": (self.scale * m).float() for layer, m in self.folded.items()}

    def broadcast_record(self) -> ArrayRecord:
        state = factor_state(self.global_factors(), with_a=self.spec.download_a, with_b=self.spec.download_b)
        sent_roles = {"A": self.spec.download_a, "B": self.spec.download_b, "head": not self.local_head}
        state.update({k: self.global_state[k] for k in extra_keys(self.global_state) if sent_roles[key_role(k)]})
        state.update(self._residual_entries())
        return state_to_record(state)

    def client_flags(self) -> dict[str, bool]:
        return {
            "train-a": self.spec.train_a,
            "train-b": self.spec.train_b,
            "upload-a": self.spec.upload_a,
            "upload-b": self.spec.upload_b,
            "upload-head": not self.local_head,
            "local-b": self.spec.local_b,
            "local-head": self.local_head,
            "check-shared-a": self.spec.check_shared_a,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, arrays, ConfigRecord({**config, **self.client_flags()}), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_evaluate(server_round, arrays, ConfigRecord({**config, **self.client_flags()}), grid)

    # ---- what comes up ---------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # DP clients whose budget is spent reply without arrays; they are recorded, not aggregated.
        refused = [msg for msg in replies if is_refusal(msg)]
        replies = [msg for msg in replies if not is_refusal(msg)]
        if not replies:
            self.round_info = {"clients_rejected": 0, "clients_refused": len(refused)}
            return None, None
        valid, _errors = self._check_and_log_replies(replies, is_train=True)
        rejected = 0
        if self.spec.check_shared_a and valid:
            expected = a_checksum(self.global_state)
            accepted = [msg for msg in valid if _client_info(msg).get(A_CHECKSUM) == expected]
            rejected = len(valid) - len(accepted)
            if rejected:
                log.warning(
                    "round %d: rejected %d client(s) whose frozen A differs from the shared A", server_round, rejected
                )
            valid = accepted
        self.round_info = {"clients_rejected": rejected, "clients_refused": len(refused)}
        if not valid:
            return None, None
        # partition order: the same sums (and SVD inputs) whatever order the replies arrived in
        contents = sorted((msg.content for msg in valid), key=_partition_order)
        states = [record_to_state(content[self.arrayrecord_key]) for content in contents]
        weights = client_weights([_metric(content, NUM_EXAMPLES) for content in contents], self.weighting)
        previous = self.global_factors()
        # Clients of a smaller rank r_k (heterogeneous ranks) upload r_k components: zero-pad them back.
        clients = [
            {layer: LayerFactors(*_padded(pair, previous[layer])) for layer, pair in client.items()}
            for client in (lora_factors(state, fill_from=previous) for state in states)
        ]
        targets = None
        if self.user_dp is not None:  # the server math sees only the noisy mean of clipped updates
            states, targets = self.user_dp.privatize(states, self.global_state, clients, previous)
            clients = [lora_factors(states[0], fill_from=previous)]
            weights = torch.ones(1, dtype=torch.float64)
            self.round_info["user_dp_epsilon"] = self.user_dp.ledger.release()
        update = self.server_math(RoundInput(clients, weights, previous, server_round, targets))

        if not self.spec.local_b and self.user_dp is None:  # FedSA: clients report a personalisation gap
            self.round_info.update(self._bias(clients, weights, previous, update))
        self.global_state.update(factor_state(update.factors))
        # Non-matrix trainables that came up (the shared head, VeRA's λ vectors) are averaged.
        for key in extra_keys(states[0]):
            self.global_state[key] = weighted_average([state[key] for state in states], weights)
        for layer, fold in update.fold.items():
            self.folded[layer] = self.folded.get(layer, 0) + fold.to(torch.float64)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self.broadcast_record(), metrics

    def adopt_broadcast(self, arrays: ArrayRecord) -> None:
        """Take what a wrapper changed in the broadcast (Flower's DP noise) as the new global state."""
        for key, value in record_to_state(arrays).items():
            if key in self.global_state:
                self.global_state[key] = value.to(self.global_state[key].dtype)

    def _bias(
        self,
        clients: list[dict[str, LayerFactors]],
        weights: torch.Tensor,
        previous: dict[str, LayerFactors],
        update: ServerUpdate,
    ) -> dict[str, Any]:
        per_layer, per_layer_round = {}, {}
        for layer, new in update.factors.items():
            broadcast = product(new)
            if layer in update.fold:
                broadcast = broadcast + update.fold[layer].to(torch.float64)
            bias = layer_bias([client[layer] for client in clients], weights, broadcast, product(previous[layer]))
            per_layer[layer], per_layer_round[layer] = bias.bias_rel, bias.bias_round_rel
        summary, summary_round = summarize(per_layer), summarize(per_layer_round)
        return {
            "bias_rel_mean": summary["mean"],
            "bias_rel_max": summary["max"],
            "bias_round_rel_mean": summary_round["mean"],
            "bias_round_rel_max": summary_round["max"],
            "bias_rel_per_layer": per_layer,
            "bias_round_rel_per_layer": per_layer_round,
        }


def _padded(pair: LayerFactors, reference: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) at the global rank (LayerFactors' field order)."""
    b, a = pad_rank(pair.B, pair.A, reference.A.shape[0])
    return a, b


def is_refusal(message: Message) -> bool:
    """A DP client's "my privacy budget is spent" reply (see clients/client_app.py)."""
    if message.has_error():
        return False
    return any(float(record.get("dp-refused", 0)) > 0 for record in message.content.metric_records.values())


def _metric(content, key: str) -> float:
    for record in content.metric_records.values():
        if key in record:
            return float(record[key])
    raise KeyError(f"reply has no metric {key!r}")


def _partition_order(content) -> float:
    try:
        return _metric(content, "partition-id")
    except KeyError:
        return 0.0  # keeps arrival order (sorted is stable)


def _client_info(message: Message) -> dict[str, Any]:
    record = message.content.config_records.get(CLIENT_INFO)
    return dict(record) if record is not None else {}
