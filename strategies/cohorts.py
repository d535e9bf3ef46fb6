"""Virtual clients on cohort nodes, seen from the server.

``CohortGrid`` wraps the run's Grid (Flower's simulation engine, real SuperNodes, or an in-process grid) so
that the strategy addresses virtual clients, unchanged:

- its node ids are the virtual clients' partition ids 0..K-1 (those whose cohort node is connected), so the
  strategy's seeded draw over sorted ids samples the same clients as a run with one node per client;
- a round's messages go down as one message per cohort node (the shared broadcast once, with the node's sampled
  clients; client k lives on node k mod N, ``fedlowrank.protocol.cohort_of``), and each node's reply comes back
  as one reply per virtual client, so every method's math, the reply checks, the ε ledger and the bytes counted
  stay per client, as if each were its own device;
- a node says which cohort it hosts when first seen (a ``query.cohort`` message). A node that has not answered
  is left out (its clients count as failed, or the round waits for it as for any missing node); a node of
  another cohort count, or two live nodes hosting one cohort, stop the run with a clear error. A node that was
  restarted answers again, and its clients' state is where it was: on that node's disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedlowrank.protocol import MalformedMessage, cohort_of
from fedlowrank.protocol import flower as wire
from strategies.replies import send_and_collect

log = logging.getLogger("fedlowrank")
QUESTION_LIFETIME = 120.0  # seconds before an unanswered "which cohort?" is asked again


class CohortError(RuntimeError):
    """The nodes do not match the run's cohorts (the text says how to start them)."""


class CohortGrid(Grid):
    """``grid``'s nodes host ``num_cohorts`` cohorts of ``num_clients`` virtual clients (module docstring)."""

    def __init__(self, grid: Grid, num_clients: int, num_cohorts: int, query_timeout: float = 15.0) -> None:
        self.grid, self.num_clients, self.num_cohorts = grid, num_clients, num_cohorts
        self.query_timeout = query_timeout
        self.node_of: dict[int, int] = {}  # cohort -> the node hosting it
        self._asked: dict[int, tuple[str, float]] = {}  # node -> (its unanswered question, when it was asked)
        self._pending: dict[str, Message] = {}
        self.node_seconds: dict[int, float] = {}  # cohort -> its node's time for its last message

    # ---- Flower's Grid ----------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The virtual clients whose cohort node is connected and has said which cohort it hosts."""
        self._refresh()
        return [client for client in range(self.num_clients) if cohort_of(client, self.num_cohorts) in self.node_of]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            ids.append(str(uuid4()))
            self._pending[ids[-1]] = message
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.send_and_receive([self._pending.pop(i) for i in list(message_ids) if i in self._pending])

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """One message per cohort node and kind of instruction; one reply per virtual client that got an answer."""
        groups = self._group(list(messages))
        outgoing = [
            Message(wire.encode_cohort_instruction(content, clients), dst_node_id=node, message_type=kind)
            for (node, kind, clients), (content, _) in groups.items()
        ]
        started = time.perf_counter()
        replies = send_and_collect(self.grid, outgoing, timeout) if outgoing else []
        self.node_seconds = {}
        answered: list[Message] = []
        for reply in replies:
            answered += self._unpack(reply, groups, time.perf_counter() - started)
        return answered

    def round_report(self) -> dict[str, Any]:
        """Each cohort node's time for the last round's messages (the slow node shows here)."""
        return {"cohort_node_seconds": dict(sorted(self.node_seconds.items()))}

    # ---- cohorts ------------------------------------------------------------------------------------------------
    def _group(self, messages: list[Message]) -> dict[tuple[int, str, tuple[int, ...]], tuple[RecordDict, list]]:
        """Messages by (node, kind, shared content): a round's messages share one content, so one group a node."""
        by_content: dict[tuple[int, str, int], list[Message]] = {}
        for message in messages:
            client = message.metadata.dst_node_id
            node = self.node_of.get(cohort_of(client, self.num_cohorts)) if 0 <= client < self.num_clients else None
            if node is None:
                raise CohortError(f"message for virtual client {client}, whose cohort node is not connected")
            kind = f"{message.metadata.message_type.split('.')[0]}.{wire.COHORT}"
            by_content.setdefault((node, kind, id(message.content)), []).append(message)
        groups = {}
        for (node, kind, _), members in by_content.items():
            clients = tuple(m.metadata.dst_node_id for m in members)
            groups[(node, kind, clients)] = (members[0].content, members)
        return groups

    def _unpack(self, reply: Message, groups: dict, elapsed: float) -> list[Message]:
        """A node's reply as the replies of the virtual clients it was sent (an error: each of them fails)."""
        node, kind = reply.metadata.src_node_id, reply.metadata.message_type
        sent = {
            m.metadata.dst_node_id: m
            for (n, k, _), (_, group) in groups.items()
            if (n, k) == (node, kind)
            for m in group
        }
        if not sent:
            log.warning("an unexpected %s reply from node %s", kind, node)
            return []
        cohort = cohort_of(next(iter(sent)), self.num_cohorts)
        self.node_seconds[cohort] = elapsed
        if reply.has_error():
            return [_error(m, f"its cohort node failed: {_first_line(reply)}") for m in sent.values()]
        try:
            members, node_seconds = wire.decode_cohort_replies(reply.content)
        except MalformedMessage as exc:
            return [_error(m, f"malformed cohort reply: {exc}") for m in sent.values()]
        self.node_seconds[cohort] = node_seconds or elapsed
        out = []
        for client, content in members.items():
            if client not in sent:
                log.warning("node %s answered for virtual client %s, which it was not sent", node, client)
            elif isinstance(content, str):
                out.append(_error(sent[client], content))
            else:
                out.append(Message(content, reply_to=sent[client]))
        return out

    def _refresh(self) -> None:
        """Learn which cohort each newly connected node hosts; forget nodes that are gone. Each unknown node is
        asked once and its answer awaited across calls (the server's wait for its nodes calls every second): a
        runtime that is still starting answers late, and asking again would only queue more questions."""
        live = set(self.grid.get_node_ids())
        self.node_of = {cohort: node for cohort, node in self.node_of.items() if node in live}
        now = time.monotonic()
        unknown = sorted(live - set(self.node_of.values()))
        self._asked = {node: asked for node, asked in self._asked.items() if node in unknown}
        ask = [
            node for node in unknown if now - self._asked.get(node, (None, -QUESTION_LIFETIME))[1] >= QUESTION_LIFETIME
        ]
        if ask:
            queries = [Message(RecordDict(), dst_node_id=node, message_type=f"query.{wire.COHORT}") for node in ask]
            for node, message_id in zip(ask, self.grid.push_messages(queries), strict=True):
                self._asked[node] = (message_id, now)
        deadline = now + self.query_timeout
        while self._asked and time.monotonic() < deadline:
            replies = list(self.grid.pull_messages([message_id for message_id, _ in self._asked.values()]))
            for reply in replies:
                self._answer(reply)
            if not replies:
                time.sleep(0.2)

    def _answer(self, reply: Message) -> None:
        asked = {message_id: node for node, (message_id, _) in self._asked.items()}
        node = asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        self._asked.pop(node, None)
        if reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
            raise CohortError(f"node {node} could not say which cohort it hosts: {_first_line(reply)}")
        if reply.has_error():  # e.g. a node that died but is still listed: left out until it answers
            log.warning("node %s did not say which cohort it hosts: %s", node, _first_line(reply))
            return
        cohort, count = wire.decode_cohort_identity(reply.content)
        self._adopt(node, cohort, count)

    def _adopt(self, node: int, cohort: int, count: int) -> None:
        start = f'start one SuperNode per cohort with --node-config "cohort-id=K num-cohorts={self.num_cohorts}"'
        if count != self.num_cohorts or not 0 <= cohort < count:
            raise CohortError(
                f"node {node} hosts cohort {cohort} of {count}, but the run has cohort-nodes={self.num_cohorts}: "
                f"{start}, K = 0..{self.num_cohorts - 1}"
            )
        previous = self.node_of.get(cohort)
        if previous is not None and previous != node and self._answers(previous):
            raise CohortError(f"nodes {previous} and {node} both host cohort {cohort}: {start}, each K once")
        if previous is not None and previous != node:
            log.warning("cohort %d moved from node %d (silent) to node %d", cohort, previous, node)
        self.node_of[cohort] = node

    def _answers(self, node: int) -> bool:
        query = Message(RecordDict(), dst_node_id=node, message_type=f"query.{wire.COHORT}")
        return any(not r.has_error() for r in send_and_collect(self.grid, [query], self.query_timeout))


def _error(message: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _first_line(reply: Message) -> str:
    return (reply.error.reason or "no reason given").strip().splitlines()[0][:300]
