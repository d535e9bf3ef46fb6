"""The fedlowrank ClientApp (Flower Message API): local training and evaluation for every method.

The model, tokenizer and this node's data partition are loaded once per process (``get_workspace``); each
message only swaps adapter tensors in. What to train, upload and keep comes with the instruction (the
method's spec, ``fedlowrank.protocol``), so the ClientApp serves every method, including ones it has never
heard of, as long as their spec names a local trainer it has (``clients/trainers.py``).
"""

from __future__ import annotations

import math
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.cohort import member_contexts, node_cohort
from clients.node import ClientFailure, ClientNode, resolve_config
from clients.trainers import (
    LocalResult,
    LoRATrainer,
    PreparedRound,
    engine_max_tokens,
    train_one,
    trainer_for,
)
from fedlowrank.checkpoint import crash_point
from fedlowrank.config import RunConfig
from fedlowrank.factors import all_finite
from fedlowrank.protocol import EvaluateReply, Refusal, TrainInstruction, TrainReply
from fedlowrank.protocol import flower as wire

__all__ = ["app", "evaluate_one", "make_client_app", "train_batch", "train_together"]


def make_client_app(bound_config: RunConfig | None = None) -> ClientApp:
    """A ClientApp; ``bound_config`` fixes the run config (tests, in-process simulation)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        instruction = wire.decode_train_instruction(message.content)
        node = ClientNode.training(context, bound_config, instruction)
        reply = train_one(trainer_for(node, instruction), node, instruction)
        crash_point(f"trained-{node.partition_id}-round-{instruction.server_round}")  # a test hook (kill -9 here)
        return Message(wire.encode_reply(reply), reply_to=message)

    @app.evaluate()
    def evaluate_on_validation(message: Message, context: Context) -> Message:
        return Message(wire.encode_reply(evaluate_one(message.content, context, bound_config)), reply_to=message)

    @app.query(wire.COHORT)
    def cohort_identity(message: Message, context: Context) -> Message:
        """Which cohort this node hosts: the server maps its virtual clients to nodes with it."""
        config = resolve_config(context, bound_config)
        return Message(wire.encode_cohort_identity(node_cohort(context, config), config.cohort_nodes), reply_to=message)

    @app.train(wire.COHORT)
    def train_cohort(message: Message, context: Context) -> Message:
        """The sampled clients this node hosts, trained together in waves; one reply each, in one message."""
        started = time.perf_counter()
        content, clients = wire.decode_cohort_instruction(message.content)
        instruction = wire.decode_train_instruction(content)  # the broadcast, decoded once for all members
        config = resolve_config(context, bound_config)
        members = member_contexts(context, clients, config)
        size = config.engine_wave_size or len(members)
        replies: list[TrainReply | Refusal | ClientFailure] = []
        for start in range(0, len(members), size):
            wave = members[start : start + size]
            replies += train_together([instruction] * len(wave), wave, bound_config)
        encoded = {client: _cohort_reply(reply) for client, reply in zip(clients, replies, strict=True)}
        return Message(wire.encode_cohort_replies(encoded, time.perf_counter() - started), reply_to=message)

    @app.evaluate(wire.COHORT)
    def evaluate_cohort(message: Message, context: Context) -> Message:
        """Each sampled client this node hosts scores its validation split; a client that fails says why."""
        started = time.perf_counter()
        content, clients = wire.decode_cohort_instruction(message.content)
        members = member_contexts(context, clients, resolve_config(context, bound_config))
        replies: dict[int, RecordDict | str] = {}
        for client, member in zip(clients, members, strict=True):
            try:
                replies[client] = wire.encode_reply(evaluate_one(content, member, bound_config))
            except Exception as exc:  # as Flower does for a lone client: this one fails, the others go on
                replies[client] = f"{type(exc).__name__}: {exc}"
        return Message(wire.encode_cohort_replies(replies, time.perf_counter() - started), reply_to=message)

    return app


def evaluate_one(content: RecordDict, context: Context, bound: RunConfig | None) -> EvaluateReply:
    """The model this client would use (global, or with its own parts) on its validation split."""
    instruction = wire.decode_evaluate_instruction(content)
    node = ClientNode.evaluating(context, bound, instruction)
    node.load(instruction.state, instruction.spec)
    workspace = node.workspace
    result = workspace.score("validation", node.partition_id)
    scored = result.num_examples > 0
    test = {}
    # a personalised client that never trained has no model of its own: it does not score the test set
    if instruction.test_set and (not instruction.spec.kept_roles() or node.has_trained()):
        # the personalised models' last scores: with generated answers for a causal LM
        test = workspace.score("test", generate=workspace.task.is_instruction).as_dict()
    return EvaluateReply(
        partition_id=node.partition_id,
        num_examples=result.num_examples,
        loss=result.loss if scored else 0.0,
        accuracy=result.accuracy if scored else 0.0,
        f1=result.macro_f1 if scored and math.isfinite(result.macro_f1) else 0.0,  # a causal LM has no F1
        personalization_gap=node.personalization_gap() if instruction.spec.kept_roles() else None,
        test=test,
    )


def train_batch(messages: list[Message], contexts: list[Context], bound: RunConfig | None) -> list[Message]:
    """Train several clients' messages together (``train_together``); the replies ``train`` would give."""
    decoded: dict[int, TrainInstruction] = {}  # a round's messages share one content: decode it once
    for message in messages:
        if id(message.content) not in decoded:
            decoded[id(message.content)] = wire.decode_train_instruction(message.content)
    replies = train_together([decoded[id(m.content)] for m in messages], contexts, bound)
    return [
        wire.error_reply(m, r) if isinstance(r, ClientFailure) else Message(wire.encode_reply(r), reply_to=m)
        for m, r in zip(messages, replies, strict=True)
    ]


def _cohort_reply(reply: TrainReply | Refusal | ClientFailure) -> RecordDict | str:
    """A cohort member's reply in the node's message: its records, or why it failed (as an error reply says)."""
    return f"{type(reply).__name__}: {reply}" if isinstance(reply, ClientFailure) else wire.encode_reply(reply)


def train_together(
    instructions: list[TrainInstruction], contexts: list[Context], bound: RunConfig | None
) -> list[TrainReply | Refusal | ClientFailure]:
    """Train several clients' instructions together on the shared base (``fedlowrank.engine``): the replies
    are the ones ``train`` would give (refusals included), and a client that fails (it diverged, or its state
    was lost) fails alone, as it would training alone: its ``ClientFailure`` in its place, the others' replies
    stand. Rounds whose trainer the engine cannot batch (GaLore, federated GaLore) go one by one."""
    from fedlowrank.engine import ClientJob, train_batched

    replies: dict[int, TrainReply | Refusal | ClientFailure] = {}
    prepared: dict[int, PreparedRound] = {}
    jobs: dict[int, ClientJob] = {}
    trainer = None
    for index, (instruction, context) in enumerate(zip(instructions, contexts, strict=True)):
        try:
            node = ClientNode.training(context, bound, instruction)
            trainer = trainer or trainer_for(node, instruction)
            outcome = trainer.prepare(node, instruction)  # sets the shared model to this client's start
        except ClientFailure as exc:  # e.g. its state is lost: it fails alone, the wave goes on
            replies[index] = exc
            continue
        if isinstance(outcome, Refusal):
            replies[index] = outcome
            continue
        data = trainer.engine_data(outcome)
        if data is None:  # not batchable: this client trains now, alone
            started = time.perf_counter()
            replies[index] = _finished(trainer, outcome, trainer.run(outcome), time.perf_counter() - started)
            continue
        # the start state, on the CPU until its wave is stacked on the device (shared by clients that start alike)
        jobs[index] = ClientJob(outcome.node.workspace.adapter_snapshot(), data, outcome.seed)
        prepared[index] = outcome
    if jobs:
        first = next(iter(prepared.values()))
        config = first.node.config
        started = time.perf_counter()
        trained = train_batched(
            first.node.model,
            list(jobs.values()),
            config.dp.local_train(config.train),
            config.optimizer,
            engine_max_tokens(config),
        )
        elapsed = (time.perf_counter() - started) / len(jobs)  # the wave's time, shared out
        finite = all_finite(tensor for state, _ in trained for tensor in state.values())  # one check, whole wave
        for index, (state, result) in zip(jobs, trained, strict=True):
            local = LocalResult(state, result, state_finite=finite)
            replies[index] = _finished(trainer, prepared[index], local, elapsed)  # type: ignore[arg-type]
    return [replies[index] for index in range(len(instructions))]


def _finished(
    trainer: LoRATrainer, prepared: PreparedRound, local: LocalResult, elapsed: float
) -> TrainReply | ClientFailure:
    try:
        return trainer.finish(prepared, local, elapsed)
    except ClientFailure as exc:  # this client sends nothing and keeps nothing; the wave goes on
        return exc


app = make_client_app()
