"""Federated GaLore: clients train full base weights on a basis shared for the round; only r x n goes up.

Per trained weight W (the base weight under a LoRA layer; the LoRA factors stay frozen with B = 0) and
round t, the basis P_t is Gaussian from ``derive_seed(seed, t, layer)``: the server sends the seed, not a
basis. Client k trains W with GaLoreAdamW on P_t (``update_gap = 0``, no weight decay, so every step is
``up(·)`` and ΔW_k stays in span(P_t)) and uploads ``down(ΔW_k)``. The server (pure math in
:func:`server_update`) averages the uploads with the clients' weights and sets W ← W + up(avg), which
equals W + Σ_k p_k ΔW_k.

The global weights live as residuals W − W0 in ``LoRAStrategy.folded`` (scale 1), so the broadcast, the
server's evaluation and the saved ``base_residuals.safetensors`` reuse the FedEx/FLoRA machinery. Downlink
is honest and dense: from round 2 on every client receives each trained W − W0 in full (m x n, fp32).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlowrank.adapters import lora_factors
from fedlowrank.fed_galore import aggregate_projected, apply_projected, projected_upload_bytes, round_projectors
from fedlowrank.galore_setup import PROJECTED_SUFFIX, check_fed_galore_rank, module_matches
from fedlowrank.projectors import Projector
from strategies.base import NUM_EXAMPLES, LoRAStrategy, _metric, _partition_order, is_refusal
from strategies.common import MethodSpec, RoundInput, ServerUpdate, client_weights, weighted_average
from strategies.records import record_to_state

SPEC = MethodSpec(
    name="fed-galore",
    train_a=False,
    train_b=False,
    upload_a=False,
    upload_b=False,
    download_a=False,
    download_b=False,
)


def layer_shapes(initial_state: Mapping[str, torch.Tensor], modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{layer: (d_out, d_in)}`` of the LoRA layers matching ``modules``, read off the factor shapes."""
    factors = lora_factors(dict(initial_state))
    return {
        layer: (int(pair.B.shape[0]), int(pair.A.shape[1]))
        for layer, pair in factors.items()
        if module_matches(layer, modules)
    }


def server_projectors(
    shapes: Mapping[str, tuple[int, int]], rank: int, seed: int, server_round: int
) -> dict[str, Projector]:
    """The round's Gaussian projectors, the ones every client rebuilds from (seed, round, layer)."""
    zeros = {layer: torch.zeros(shape, dtype=torch.float32) for layer, shape in shapes.items()}
    return round_projectors(zeros, "gaussian", rank, seed, server_round)


def server_update(
    residuals: Mapping[str, torch.Tensor],
    uploads: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    projectors: Mapping[str, Projector],
) -> dict[str, torch.Tensor]:
    """New residuals W − W0: residual + up(Σ_k p_k L_k) per layer, in float64 (weights are normalised)."""
    current = {
        layer: residuals.get(layer, torch.zeros(projector.shape or (0, 0), dtype=torch.float64)).to(torch.float64)
        for layer, projector in projectors.items()
    }
    aggregate = aggregate_projected(list(uploads), weights)
    return apply_projected(current, projectors, aggregate)


def _no_factor_math(inputs: RoundInput) -> ServerUpdate:
    raise RuntimeError("fed-galore aggregates projected updates, not LoRA factors")


class FedGaLoreStrategy(LoRAStrategy):
    """``LoRAStrategy`` whose factors never change: the learned full-weight update is the folded residual."""

    def __init__(
        self,
        initial_state: dict[str, torch.Tensor],
        shapes: Mapping[str, tuple[int, int]],
        rank: int,
        seed: int,
        weighting: str = "num-examples",
        **fedavg_kwargs: Any,
    ) -> None:
        check_fed_galore_rank(dict(shapes), rank)
        super().__init__(SPEC, _no_factor_math, initial_state, scale=1.0, weighting=weighting, **fedavg_kwargs)
        self.shapes = dict(shapes)
        self.rank = rank
        self.seed = seed

    def client_flags(self) -> dict[str, bool]:
        return {**super().client_flags(), "fed-galore": True, "galore-seed": self.seed}  # type: ignore[dict-item]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [msg for msg in replies if not is_refusal(msg)]
        valid, _errors = self._check_and_log_replies(replies, is_train=True)
        self.round_info = {"clients_rejected": 0, "clients_refused": 0}
        if not valid:
            return None, None
        contents = sorted((msg.content for msg in valid), key=_partition_order)
        states = [record_to_state(content[self.arrayrecord_key]) for content in contents]
        weights = client_weights([_metric(content, NUM_EXAMPLES) for content in contents], self.weighting)
        uploads = [
            {key[: -len(PROJECTED_SUFFIX)]: value for key, value in state.items() if key.endswith(PROJECTED_SUFFIX)}
            for state in states
        ]
        projectors = server_projectors(self.shapes, self.rank, self.seed, server_round)
        if any(set(upload) != set(projectors) for upload in uploads):
            raise ValueError("a fed-galore client uploaded projected updates for other layers than the server's")
        self.folded = server_update(self.folded, uploads, weights.tolist(), projectors)
        for key in sorted(k for k in states[0] if not k.endswith(PROJECTED_SUFFIX)):  # the shared head
            self.global_state[key] = weighted_average([state[key] for state in states], weights)
        projected, dense = projected_upload_bytes(projectors)
        self.round_info.update({"galore_projected_bytes": projected, "galore_dense_bytes": dense})
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return self.broadcast_record(), metrics


__all__ = ["SPEC", "FedGaLoreStrategy", "layer_shapes", "server_projectors", "server_update"]
