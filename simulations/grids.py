"""In-process simulation: Flower ``Grid`` s that answer messages by calling the ClientApp directly
(``InProcessGrid``, one client after another) or by training a round's clients together (``BatchedGrid``).

No Ray, no processes: every virtual SuperNode has its own ``Context`` (node config and persistent state, as
in Flower), and all share one loaded base model. The strategy and the ClientApp are the same objects that run
under ``flwr run`` and on real SuperNodes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import train_batch
from fedlowrank.config import RunConfig
from fedlowrank.protocol.flower import error_reply


def adopt_server_identity(run_id: int = 1) -> None:
    """Messages built by the server read the process's task identity, which Flower's runtimes set before a
    ServerApp runs; the in-process grids run no runtime, so they set it (the one Flower internal this project
    touches; tests/test_layering.py fails loudly if Flower renames it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


class NodeContexts(Mapping[int, Context]):
    """Each virtual node's Flower Context, made when the node first gets a message (then kept: it holds the
    node's state). Registered nodes cost a dictionary entry, not a Context with its own copy of the run config:
    10,000 registered clients of which 100 train cost what 100 do."""

    def __init__(
        self, node_ids: list[int], run_id: int, run_config: dict[str, Any], node_config: dict[str, Any]
    ) -> None:
        self.partition_of = {node_id: pid for pid, node_id in enumerate(node_ids)}
        self._run_id, self._run_config, self._node_config = run_id, run_config, node_config
        self._made: dict[int, Context] = {}

    def __getitem__(self, node_id: int) -> Context:
        if node_id not in self._made:
            pid = self.partition_of[node_id]  # KeyError for a node that is not registered
            node_config = {"partition-id": pid, "num-partitions": len(self.partition_of), **self._node_config}
            self._made[node_id] = Context(
                run_id=self._run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(self._run_config),
            )
        return self._made[node_id]

    def __contains__(self, node_id: object) -> bool:  # without making the node's Context
        return node_id in self.partition_of

    def __iter__(self) -> Iterator[int]:
        return iter(self.partition_of)

    def __len__(self) -> int:
        return len(self.partition_of)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one after another."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, Any] | None = None,
        run_id: int = 1,
        on_reply: Callable[[Message], None] | None = None,
        seed: int = 0,
        node_config: dict[str, Any] | None = None,
    ) -> None:
        """``node_config``: what every virtual node's --node-config adds to its partition (e.g. its state-dir)."""
        self.client_app = client_app
        self.on_reply = on_reply
        self._run = Run.create_empty(run_id)
        rng = random.Random(seed)
        # ascending with the partition: the server samples from the sorted node ids (reproducible in deployments,
        # whose grids list nodes in no fixed order), which here is partition order
        self.node_ids = sorted(rng.getrandbits(63) for _ in range(num_nodes))
        self.contexts = NodeContexts(self.node_ids, run_id, dict(run_config or {}), node_config or {})
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"unknown destination node {message.metadata.dst_node_id}")
            ids.append(str(uuid4()))  # this grid's own handle for the message
            self._pending[ids[-1]] = message
        return ids

    def _handle(self, message: Message) -> Message:
        try:
            reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:  # as Flower does: a failing client becomes an error reply
            reply = error_reply(message, exc)
        self._notify([reply])
        return reply

    def _notify(self, replies: list[Message]) -> None:
        if self.on_reply is not None:
            for reply in replies:
                self.on_reply(reply)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._handle(self._pending.pop(mid)) for mid in list(message_ids) if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


class BatchedGrid(InProcessGrid):
    """Answers a round's train messages by training the sampled clients together on the shared base.

    Strategies see the same messages and replies as with ``InProcessGrid``, built by the same ClientApp code
    (``clients.client_app.train_batch``); only local training runs as one batched job per wave of at most
    ``wave_size`` clients (DP-SGD included: each client clips, noises and accounts for itself). Between waves
    and rounds every client's state (FedSA's own B, DP accountants) stays in its ``Context`` or disk store, on
    the CPU; only the wave being trained is stacked on the device. Evaluation messages, and rounds the engine
    does not cover (GaLore optimizers, federated GaLore), go through the ClientApp one by one.
    """

    def __init__(self, *args: Any, bound_config: RunConfig, wave_size: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound_config = bound_config
        self.wave_size = wave_size

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        messages = [self._pending.pop(mid) for mid in list(message_ids) if mid in self._pending]
        train = [m for m in messages if m.metadata.message_type == "train"]
        replies = [self._handle(m) for m in messages if m.metadata.message_type != "train"]
        size = self.wave_size if self.wave_size > 0 else max(len(train), 1)
        for start in range(0, len(train), size):
            wave = train[start : start + size]
            contexts = [self.contexts[m.metadata.dst_node_id] for m in wave]
            try:
                wave_replies = train_batch(wave, contexts, self.bound_config)
            except Exception as exc:  # the whole wave failed: every client in it gets the error, as in Flower
                wave_replies = [error_reply(m, exc) for m in wave]
            self._notify(wave_replies)
            replies.extend(wave_replies)
        return replies
