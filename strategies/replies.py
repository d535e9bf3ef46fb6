"""Waiting for replies without waiting on a timer: Flower's grids poll for replies every 0.1 s (simulation) or
every 3 s (a deployment's SuperLink), which on short rounds is most of the round. ``send_and_collect`` polls
every 10 ms at first, then every ``LATE_FRACTION`` of the time already waited (at most once a second): a reply
is collected at most 5 % (or 1 s) after it arrives, and a long round costs a poll a second. (A poll interval
that only grows, 1.5× a poll, had a 0.55 s round of two cohort nodes collected at 0.75 s.)"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.01  # seconds
LATE_FRACTION = 0.05  # of the time waited so far: how late a reply may be collected
LONGEST_POLL = 1.0


def poll_interval(waited: float) -> float:
    """Seconds to sleep before the next poll, ``waited`` seconds after the messages went out."""
    return min(max(FIRST_POLL, LATE_FRACTION * waited), LONGEST_POLL)


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
    """Push ``messages`` and return their replies, as ``Grid.send_and_receive`` does (``timeout`` None: wait for
    every reply; otherwise at most ``timeout`` seconds, then what has arrived)."""
    message_ids = list(grid.push_messages(list(messages)))
    sent = time.monotonic()
    deadline = None if timeout is None else sent + timeout
    replies: list[Message] = []
    while True:
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        waiting = [message_id for message_id in message_ids if message_id not in answered]
        replies += grid.pull_messages(waiting)
        # one reply per message (an in-process grid's handles are not the messages' ids: count them)
        now = time.monotonic()
        if len(replies) >= len(message_ids) or (deadline is not None and now >= deadline):
            return replies
        interval = poll_interval(now - sent)
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - now)))
