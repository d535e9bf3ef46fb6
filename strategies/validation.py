"""Every train reply is checked against what the server expects before any method's math sees it.

A reply is rejected, with the reason recorded for that client, when its example count is not a positive
whole number within the training set, its partition is out of range, it uploads other tensors than its
method's spec asks for (missing, extra, another dtype, another shape, another rank), a value is NaN or
infinite, its training loss is not finite, its update (upload minus the global tensor) is longer than
``server.max-update-norm``, or, for methods that share a frozen A, its A differs from the server's. The rest of
the round goes on without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlowrank.factors import client_rank, key_role, non_finite_keys, select_roles
from fedlowrank.protocol import MethodSpec, TrainReply, a_checksum

WIRE_DTYPE = torch.float32  # adapters travel in fp32 (fedlowrank.protocol.flower)


@dataclass(frozen=True)
class ReplyRules:
    spec: MethodSpec
    train_head: bool = True
    num_clients: int = 1
    max_examples: int = 0  # 0: no upper bound known
    max_update_norm: float = 0.0  # 0: no bound
    client_ranks: tuple[int, ...] = ()  # heterogeneous ranks (lora.client-ranks); empty: every client the global rank
    extra_uploads: tuple[tuple[str, tuple[int, ...]], ...] = ()  # uploads beyond the adapter: (key, shape)


class ReplyValidator:
    """``reason(reply, global_state)``: why a reply must not be aggregated, or None."""

    def __init__(self, rules: ReplyRules) -> None:
        self.rules = rules
        # a round's replies are checked against one global state: their expected shapes per rank, made once
        self._shapes_for: tuple[dict | None, dict[int, dict[str, tuple[int, ...]]]] = (None, {})

    def reason(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        for check in (self._counts, self._tensors, self._values, self._update_norm, self._shared_a):
            problem = check(reply, global_state)
            if problem is not None:
                return problem
        return None

    def expected_shapes(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        rules = self.rules
        rank = client_rank(list(rules.client_ranks), reply.partition_id, 0)
        checked_against, by_rank = self._shapes_for
        if checked_against is not global_state:
            by_rank = {}
            self._shapes_for = (global_state, by_rank)
        if rank not in by_rank:
            uploaded = select_roles(global_state, *rules.spec.uploaded_roles(rules.train_head))
            shapes = {key: _sliced(key, tuple(value.shape), rank) for key, value in uploaded.items()}
            shapes.update(dict(rules.extra_uploads))
            by_rank[rank] = shapes
        return by_rank[rank]

    def _counts(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        if not 0 <= reply.partition_id < self.rules.num_clients:
            return f"partition-id {reply.partition_id} is outside 0..{self.rules.num_clients - 1}"
        if reply.num_examples < 1 or (self.rules.max_examples and reply.num_examples > self.rules.max_examples):
            bound = f" (the training set has {self.rules.max_examples})" if self.rules.max_examples else ""
            return f"num-examples {reply.num_examples} is not a positive count within the training set{bound}"
        if not math.isfinite(reply.train_loss):
            return f"its training loss is {reply.train_loss} (the client diverged)"
        return None

    def _tensors(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        expected = self.expected_shapes(reply, global_state)
        missing, extra = sorted(set(expected) - set(reply.state)), sorted(set(reply.state) - set(expected))
        if missing or extra:
            return f"it uploads other tensors than expected (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, value in reply.state.items():
            if value.dtype != WIRE_DTYPE:
                return f"{key} is {value.dtype}, not {WIRE_DTYPE} as sent on the wire"
            if tuple(value.shape) != expected[key]:
                return f"{key} has shape {tuple(value.shape)}, expected {expected[key]}"
        return None

    def _values(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        if reply.state_finite:  # checked as the round's replies were read
            return None
        bad = non_finite_keys(reply.state)
        return f"{len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]})" if bad else None

    def _update_norm(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        if self.rules.max_update_norm <= 0:
            return None
        squares = 0.0
        for key, value in reply.state.items():
            delta = value.double()
            if key in global_state:
                reference = global_state[key].double()
                delta = delta - reference[tuple(slice(0, size) for size in value.shape)]
            squares += float(delta.pow(2).sum())
        norm = math.sqrt(squares)
        if norm > self.rules.max_update_norm:
            return f"its update norm {norm:.4g} exceeds server.max-update-norm={self.rules.max_update_norm:g}"
        return None

    def _shared_a(self, reply: TrainReply, global_state: dict[str, torch.Tensor]) -> str | None:
        if self.rules.spec.check_shared_a and reply.a_checksum != a_checksum(global_state):
            return "its frozen A differs from the shared A (checksum mismatch)"
        return None


def _sliced(key: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """A rank-r_k client's factor shape: A (r_k, d_in), B (d_out, r_k); anything else as the global tensor."""
    if rank <= 0 or len(shape) != 2:
        return shape
    role = key_role(key)
    if role == "A":
        return (rank, shape[1])
    if role == "B":
        return (shape[0], rank)
    return shape
