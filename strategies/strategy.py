"""``LoRAStrategy``: the one Flower strategy, around any registered method's pure server math.

It samples nodes (seeded: the same run samples the same clients), sends each the round's instruction (the
broadcast plus the method's spec), decodes and checks the replies, weights the accepted clients, passes
them through user-level DP when the run asks for it, runs the method's ``server_update``, averages the
shared head, keeps the global adapter and what was folded into the frozen weights, and measures the
aggregation bias. It implements Flower's ``Strategy`` (so ``Strategy.start`` can drive it too); fedlowrank's
own loop (``strategies/server_app.py``) calls the typed ``train_round`` / ``evaluate_round`` to get the
round's full account (who was accepted, rejected, refused or failed, and why).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlowrank.checkpoint import prefixed, unprefixed
from fedlowrank.config import RunConfig
from fedlowrank.factors import (
    RESIDUAL_SUFFIX,
    LayerFactors,
    factor_state,
    key_role,
    lora_factors,
    non_finite_keys,
)
from fedlowrank.lowrank import pad_rank, product
from fedlowrank.metrics import layer_bias, summarize
from fedlowrank.protocol import (
    EvaluateInstruction,
    EvaluateReply,
    MalformedMessage,
    Refusal,
    TrainInstruction,
    TrainReply,
)
from fedlowrank.protocol import flower as wire
from strategies.method import RoundInput, ServerUpdate, client_weights, weighted_average
from strategies.registry import ResolvedMethod, get_method, resolve_method
from strategies.user_dp import ClientUpdates, NoUserDP, UpdatePrivacy, UserLevelDP
from strategies.validation import ReplyRules, ReplyValidator

log = logging.getLogger("fedlowrank")


class FederationError(RuntimeError):
    """The federation cannot go on (too few nodes, no client produced a result); the text says why."""


class AggregateError(RuntimeError):
    """A round's aggregate could not be formed (the method failed, or produced NaN/inf): the model is kept."""


def _first_line(text: str) -> str:
    return (text or "no reason given").strip().splitlines()[0][:300]


def _unanswered(sent: Iterable[Message], replies: list[Message]) -> dict[str, str]:
    answered = {reply.metadata.src_node_id for reply in replies}
    return {
        f"node-{message.metadata.dst_node_id}": "no reply (timed out, or the node went away)"
        for message in sent
        if message.metadata.dst_node_id not in answered
    }


@dataclass(frozen=True)
class Sampling:
    """Node sampling as Flower's built-in strategies do it, seeded per run, round and phase, with a bounded wait.

    Each round waits up to ``node_wait_seconds`` for all ``num_clients`` nodes, then goes on with those
    connected if there are at least ``min_available`` (a dead node slows a round down once, never forever).
    """

    fraction_train: float
    fraction_evaluate: float
    num_clients: int
    seed: int = 0
    node_wait_seconds: float = 120.0
    min_available: int = 1
    cohort_nodes: int = 0  # > 0: each node hosts a cohort of virtual clients (the grid lists the clients)

    @classmethod
    def from_config(cls, config: RunConfig) -> Sampling:
        return cls(
            config.fraction_train,
            config.fraction_evaluate,
            config.num_clients,
            config.seed,
            config.node_wait_seconds,
            config.server.min_available,
            config.cohort_nodes,
        )

    def sample(self, grid: Grid, server_round: int, phase: str) -> list[int]:
        fraction = self.fraction_train if phase == "train" else self.fraction_evaluate
        if fraction == 0.0:
            return []
        nodes = self.wait_for_nodes(grid)
        size = min(len(nodes), max(int(len(nodes) * fraction), max(1, int(self.num_clients * fraction))))
        rng = random.Random(self.seed * 1_000_003 + server_round * 2 + (phase == "evaluate"))
        return rng.sample(nodes, size)

    def wait_for_nodes(self, grid: Grid, poll_seconds: float = 1.0) -> list[int]:
        """The connected nodes: all of them as soon as they are there, else, after ``node_wait_seconds``, those
        connected if they are enough; a clear error otherwise (never a wait that does not end)."""
        deadline = time.monotonic() + self.node_wait_seconds
        while len(nodes := sorted(grid.get_node_ids(), key=lambda n: n)) < self.num_clients:
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_seconds)
        if len(nodes) >= self.min_available:
            if len(nodes) < self.num_clients:
                log.warning("%d of %d nodes connected: going on with them", len(nodes), self.num_clients)
            return nodes
        raise FederationError(
            f"only {len(nodes)} {'client' if self.cohort_nodes else 'node'}(s) connected after "
            f"{self.node_wait_seconds:.0f} s, but the run needs server.min-available={self.min_available} "
            f"(of num-clients={self.num_clients}). {self._how_to_start_nodes()} Finished rounds are saved: "
            "continue with --resume."
        )

    def _how_to_start_nodes(self) -> str:
        if self.cohort_nodes:
            return (
                f"Each of the run's cohort-nodes={self.cohort_nodes} nodes hosts its clients k with k mod "
                f"{self.cohort_nodes} = K: with `flwr run .` pass --federation-config "
                f'"num-supernodes={self.cohort_nodes}"; in a deployment start one SuperNode per cohort '
                f'(--node-config "cohort-id=K num-cohorts={self.cohort_nodes}"), K = 0..{self.cohort_nodes - 1}.'
            )
        return (
            f'With `flwr run .` pass --federation-config "num-supernodes={self.num_clients}"; in a deployment '
            'start one SuperNode per partition (--node-config "partition-id=K num-partitions=N").'
        )


@dataclass
class TrainRoundResult:
    """One round's training, as the server saw it."""

    arrays: ArrayRecord | None  # the new broadcast (None: nothing was aggregated, the global model is unchanged)
    replies: list[TrainReply | Refusal]  # every decoded reply (the ε ledger reads them all)
    accepted: list[TrainReply]
    refused: list[Refusal]
    rejected: dict[str, str]  # client -> why its reply was not aggregated
    failed: dict[str, str]  # node -> why it produced no reply (the ClientApp raised, a timeout, a lost node)
    metrics: dict[str, Any] = field(default_factory=dict)  # bias, user-level ε, the method's own
    kept_previous: str = ""  # why the global model was not updated this round, if it was not

    @property
    def train_loss(self) -> float | None:
        return weighted_mean([r.train_loss for r in self.accepted], [r.num_examples for r in self.accepted])

    def record(self) -> dict[str, Any]:
        """The round's account for metrics.jsonl: who trained, failed, was rejected or refused, and why."""
        row: dict[str, Any] = {
            "clients_trained": len(self.replies),
            "clients_accepted": len(self.accepted),
            "clients_failed": len(self.failed),
            "clients_rejected": len(self.rejected),
            "clients_refused": len(self.refused),
            "train_loss": self.train_loss,
        }
        if self.failed:
            row["clients_failed_reasons"] = dict(self.failed)
        if self.rejected:
            row["clients_rejected_reasons"] = dict(self.rejected)
        if self.kept_previous:
            row["global_model_kept"] = self.kept_previous
        return {**row, **self.metrics}


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float | None:
    """Σ v_k w_k / Σ w_k, summed in the order given (as Flower's metric aggregation); None without weight."""
    total = float(sum(weights))
    if not values or total <= 0:
        return None
    mean = 0.0
    for index, (value, weight) in enumerate(zip(values, weights, strict=True)):
        mean = value * (weight / total) if index == 0 else mean + value * (weight / total)
    return mean


class LoRAStrategy(Strategy):
    """Flower's strategy contract around a ``ResolvedMethod`` (see the module docstring)."""

    def __init__(
        self,
        method: ResolvedMethod,
        initial_state: dict[str, torch.Tensor],
        *,
        scale: float,
        sampling: Sampling,
        weighting: str = "num-examples",
        seed: int = 0,
        privacy: UpdatePrivacy | None = None,
        validator: ReplyValidator | None = None,
        min_valid_replies: int = 1,
    ) -> None:
        self.method, self.spec = method, method.spec
        self.validator = (
            validator if validator is not None else ReplyValidator(ReplyRules(method.spec, num_clients=2**31))
        )
        self.min_valid_replies = min_valid_replies
        self.scale, self.sampling, self.weighting, self.seed = scale, sampling, weighting, seed
        self.privacy: UpdatePrivacy = privacy if privacy is not None else NoUserDP()
        self.global_state = {k: v.clone() for k, v in initial_state.items()}
        self.folded: dict[str, torch.Tensor] = {}  # Σ of folded ΔW per layer, float64, weight units
        self.method_state: dict[str, torch.Tensor] = {}  # what the method keeps between rounds (ServerUpdate.state)

    @classmethod
    def for_method(
        cls,
        name: str,
        initial_state: dict[str, torch.Tensor],
        *,
        scale: float = 1.0,
        weighting: str = "num-examples",
        num_clients: int = 1,
        seed: int = 0,
    ) -> LoRAStrategy:
        """Method ``name`` with its default options, outside a run config (your own server loop, tests)."""
        definition = get_method(name)
        options = definition.options()
        method = ResolvedMethod(definition, options, options.adjust_spec(definition.spec))
        return cls(
            method,
            initial_state,
            scale=scale,
            sampling=Sampling(1.0, 1.0, num_clients, seed),
            weighting=weighting,
            seed=seed,
        )

    # ---- what goes down -------------------------------------------------------------------------------------
    def global_factors(self) -> dict[str, LayerFactors]:
        return lora_factors(self.global_state)

    def global_model_state(self) -> dict[str, torch.Tensor]:
        """The full global adapter plus residual entries: what the server evaluates and saves."""
        return {**self.global_state, **self._residual_entries()}

    def base_residuals(self) -> dict[str, torch.Tensor]:
        """What was folded into each layer's frozen weight (W − W0, fp32), empty for most methods."""
        return {layer: m.float().contiguous() for layer, m in self.folded.items()}

    def _residual_entries(self) -> dict[str, torch.Tensor]:
        return {f"{layer}{RESIDUAL_SUFFIX}": m.float() for layer, m in self.folded.items()}

    def broadcast_state(self) -> dict[str, torch.Tensor]:
        sent = self.spec.downloaded_roles()
        return {
            **{k: v for k, v in self.global_state.items() if key_role(k) in sent},
            **self._residual_entries(),
        }

    def broadcast_record(self) -> ArrayRecord:
        return wire.state_to_record(self.broadcast_state())

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the strategy needs to go on: the global adapter, what was folded into the frozen weights,
        the method's own state and the user-level DP mechanism's (dtypes kept)."""
        return {
            **prefixed(self.global_state, "global"),
            **prefixed(self.folded, "folded"),
            **prefixed(self.method_state, "method"),
            **prefixed(self.privacy.state_dict(), "privacy"),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.global_state = unprefixed(state, "global")
        self.folded = unprefixed(state, "folded")
        self.method_state = unprefixed(state, "method")
        self.privacy.load_state_dict(unprefixed(state, "privacy"))

    # ---- Flower's Strategy ----------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        instruction = TrainInstruction(server_round, self.spec, {}, seed=self.seed, **wire.run_fields(config))
        content = wire.encode_instruction(instruction, arrays)
        nodes = self.sampling.sample(grid, server_round, "train")
        return [Message(content, dst_node_id=node, message_type="train") for node in nodes]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        test_set = bool(config.get(wire.TEST_SET, False))
        instruction = EvaluateInstruction(server_round, self.spec, {}, test_set=test_set, **wire.run_fields(config))
        content = wire.encode_instruction(instruction, arrays)
        nodes = self.sampling.sample(grid, server_round, "evaluate")
        return [Message(content, dst_node_id=node, message_type="evaluate") for node in nodes]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = self.train_round(server_round, replies)
        loss = result.train_loss
        return result.arrays, (MetricRecord({"train-loss": loss}) if loss is not None else None)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = self.evaluate_round(server_round, replies)
        return MetricRecord(metrics) if metrics else None

    def summary(self) -> None:
        log.info("%s: %s (spec %s)", type(self).__name__, self.method.name, self.spec)

    # ---- what comes up --------------------------------------------------------------------------------------
    def train_round(
        self, server_round: int, replies: Iterable[Message], sent: Iterable[Message] = ()
    ) -> TrainRoundResult:
        """Decode and check the replies, aggregate the accepted ones, and say what happened to every client
        (``sent``: the round's instructions, so that a client that never answered counts as failed)."""
        replies = list(replies)
        decoded: list[TrainReply | Refusal] = []
        accepted: list[TrainReply] = []
        failed, rejected = _unanswered(sent, replies), {}
        answered = [message for message in replies if not message.has_error()]
        read = dict(zip(map(id, answered), wire.decode_train_replies([m.content for m in answered]), strict=True))
        for message in replies:
            node = f"node-{message.metadata.src_node_id}"
            if message.has_error():
                failed[node] = _first_line(message.error.reason)
                continue
            reply = read[id(message)]
            if isinstance(reply, MalformedMessage):
                rejected[node] = f"malformed reply: {reply}"
                continue
            decoded.append(reply)
            if isinstance(reply, Refusal):
                continue
            reason = self.validator.reason(reply, self.global_state)
            if reason is None:
                accepted.append(reply)
            else:
                client = str(reply.partition_id)
                rejected[client if client not in rejected else f"{client} ({node})"] = reason
        refused = [r for r in decoded if isinstance(r, Refusal)]
        if rejected:
            log.warning("round %d: rejected %d client(s): %s", server_round, len(rejected), rejected)
        accepted.sort(key=lambda reply: reply.partition_id)  # the same sums whatever order replies arrived in
        result = TrainRoundResult(None, decoded, accepted, refused, rejected, failed)
        if len(accepted) < self.min_valid_replies:
            if accepted or rejected:
                result.kept_previous = (
                    f"only {len(accepted)} valid repl{'y' if len(accepted) == 1 else 'ies'}, fewer than "
                    f"server.min-valid-replies={self.min_valid_replies}"
                )
                result.arrays = self.broadcast_record()
            return result
        try:
            result.metrics = self._aggregate(server_round, accepted)
        except AggregateError as exc:
            log.warning("round %d: the global model is kept: %s", server_round, exc)
            result.kept_previous = str(exc)
        result.arrays = self.broadcast_record()
        return result

    def _aggregate(self, server_round: int, accepted: list[TrainReply]) -> dict[str, Any]:
        uploads = [reply.state for reply in accepted]
        previous = self.global_factors()
        # Clients of a smaller rank r_k (heterogeneous ranks) upload r_k components: zero-pad them back.
        factors = [
            {layer: _padded(pair, previous[layer]) for layer, pair in lora_factors(state, fill_from=previous).items()}
            for state in uploads
        ]
        weights = client_weights([reply.num_examples for reply in accepted], self.weighting)
        updates = self.privacy.privatize(ClientUpdates(uploads, factors, weights), self.global_state, previous)
        inputs = RoundInput(
            updates.factors,
            updates.weights,
            previous,
            server_round,
            updates.target_products,
            uploads=updates.uploads,
            seed=self.seed,
            scale=self.scale,
            state=dict(self.method_state),
        )
        try:
            update = self.method.server_update(inputs)
        except Exception as exc:  # the method's math failed on these inputs: keep the model, say why
            raise AggregateError(f"{self.method.name}'s server update failed: {type(exc).__name__}: {exc}") from exc
        metrics = dict(updates.metrics)
        # Bias needs each client's update; a personalised method reports a personalisation gap instead, and
        # under user-level DP the individual updates must not be released.
        if self.spec.trains_factors and not self.spec.personalized and not self.privacy.active:
            metrics.update(self._bias(updates.factors, updates.weights, previous, update))
        metrics.update(update.metrics)
        self._apply(update, updates)
        return metrics

    def _apply(self, update: ServerUpdate, updates: ClientUpdates) -> None:
        """The new global state, all or nothing: built aside, checked finite, then swapped in."""
        state = dict(self.global_state)
        state.update(factor_state(update.factors))
        # Non-matrix trainables of the global adapter that came up (the shared head, VeRA's λ) are averaged.
        for key in sorted(k for k in updates.uploads[0] if k in state and k not in factor_keys(update)):
            state[key] = weighted_average([upload[key] for upload in updates.uploads], updates.weights)
        folded = dict(self.folded)
        for layer, fold in update.fold.items():
            folded[layer] = folded.get(layer, 0) + fold.to(torch.float64)
        produced = {**state, **{f"folded:{k}": v for k, v in folded.items()}, **(update.state or {})}
        not_finite = non_finite_keys(produced)
        if not_finite:
            raise AggregateError(f"the aggregate is not finite ({len(not_finite)} tensors, e.g. {not_finite[0]})")
        self.global_state, self.folded = state, folded
        if update.state is not None:
            self.method_state = dict(update.state)

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
            if layer in update.fold:  # in product units, like the clients' B_k A_k
                broadcast = broadcast + update.fold[layer].to(torch.float64) / self.scale
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

    def evaluate_round(self, server_round: int, replies: Iterable[Message]) -> dict[str, float]:
        """The clients' evaluation, weighted by the examples each one scored."""
        scored: list[EvaluateReply] = []
        for message in replies:
            if message.has_error():
                continue
            try:
                scored.append(wire.decode_evaluate_reply(message.content))
            except MalformedMessage as exc:
                log.warning("round %d: ignoring a malformed evaluation reply: %s", server_round, exc)
        scored.sort(key=lambda reply: reply.partition_id)
        counts = [reply.num_examples for reply in scored]
        metrics = {}
        for name in ("loss", "accuracy", "f1"):
            metrics[f"client_eval_{name}"] = weighted_mean([getattr(r, name) for r in scored], counts)
        gaps = [r.personalization_gap for r in scored]
        if scored and all(gap is not None for gap in gaps):
            metrics["personalization_gap"] = weighted_mean(gaps, counts)  # type: ignore[arg-type]
        # Personalised models on the global test set: the plain mean over the clients that scored it (each
        # client's model counts once; clients that never trained have no model of their own and do not score)
        tested = [r for r in scored if r.test]
        for name in sorted({name for r in tested for name in r.test}):
            values = [r.test[name] for r in tested if name in r.test]
            metrics[f"test_{name}"] = sum(values) / len(values)
        if tested:
            metrics["test_clients_scored"] = len(tested)
        return {key: value for key, value in metrics.items() if value is not None}


def factor_keys(update: ServerUpdate) -> set[str]:
    return set(factor_state(update.factors))


def _padded(pair: LayerFactors, reference: LayerFactors) -> LayerFactors:
    """The pair at the global rank (zero components added)."""
    b, a = pad_rank(pair.B, pair.A, reference.A.shape[0])
    return LayerFactors(A=a, B=b)


def build_strategy(
    config: RunConfig,
    initial_state: dict[str, torch.Tensor],
    method: ResolvedMethod | None = None,
    max_examples: int = 0,
) -> LoRAStrategy:
    """The run's strategy: its method (checked against the config and the adapter), the checks every reply
    passes (``max_examples``: the training set's size), and, when asked for, user-level DP in the mode the
    method declares."""
    method = method if method is not None else resolve_method(config)
    method.options.check_adapter(initial_state)
    privacy: UpdatePrivacy = NoUserDP()
    if config.dp.user_level and method.definition.user_dp is not None:
        privacy = UserLevelDP.from_config(config, method.definition.user_dp)
    rules = ReplyRules(
        method.spec,
        train_head=config.lora.train_head,
        num_clients=config.num_clients,
        max_examples=max_examples,
        max_update_norm=config.server.max_update_norm,
        client_ranks=tuple(config.lora.client_ranks),
        extra_uploads=tuple(method.options.extra_uploads(initial_state).items()),
    )
    return LoRAStrategy(
        method,
        initial_state,
        scale=config.lora.scale,
        sampling=Sampling.from_config(config),
        weighting=config.weighting,
        seed=config.seed,
        privacy=privacy,
        validator=ReplyValidator(rules),
        min_valid_replies=config.server.min_valid_replies,
    )
