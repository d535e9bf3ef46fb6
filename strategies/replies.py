"""Waiting for replies without waiting on a timer: Flower's grids poll for replies every 0.1 s (simulation) or
every 3 s (a deployment's SuperLink), which on short rounds is most of the round. ``send_and_collect`` polls
after 10 ms and backs off to one poll a second, so a round's replies are collected soon after the last one
arrives and a long round costs a poll a second."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.01  # seconds
LONGEST_POLL = 1.0


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
    """Push ``messages`` and return their replies, as ``Grid.send_and_receive`` does (``timeout`` None: wait for
    every reply; otherwise at most ``timeout`` seconds, then what has arrived)."""
    message_ids = list(grid.push_messages(list(messages)))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    interval = FIRST_POLL
    while True:
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        waiting = [message_id for message_id in message_ids if message_id not in answered]
        replies += grid.pull_messages(waiting)
        # one reply per message (an in-process grid's handles are not the messages' ids: count them)
        if len(replies) >= len(message_ids) or (deadline is not None and time.monotonic() >= deadline):
            return replies
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(interval * 1.5, LONGEST_POLL)
