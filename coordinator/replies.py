"""Collecting replies from agents within a deadline that no agent can stretch.

Flower's Grid delivers a reply in two steps: the SuperNode registers the message, then
uploads its objects (the arrays). The Grid's ``pull_messages`` waits for those objects
with Flower's ``PULL_MAX_TIME`` (two hours) of retries, bounded in practice only by the
SuperLink's 180 s object-push session. An agent that registers a reply and never uploads
it (a hostile one, or one killed mid-upload) would hold every round for three minutes,
past ``federation.round_timeout``. Here each pull waits at most until the deadline of
the collection it belongs to (Flower checks it between retries, so a pull may end up to
its 10 s backoff cap later); a reply not uploaded by then comes back as Flower's
``MESSAGE_UNAVAILABLE`` error reply and is rejected like any failed reply. Replies that
arrived while a stalled one held the pull are fetched by one last pull at the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import flwr.superlink.grid.http_grid as http_grid
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import pull_objects

from fedtune.processes import yield_to_clients

REPLY_POLL_SECONDS = 0.2
MIN_PULL_SECONDS = 1.0  # a reply that is being uploaded at the deadline still gets this long

_deadline = float("inf")  # of the collection in progress (the ServerApp collects from one thread)


def pull_objects_until_deadline(*args: Any, **kwargs: Any) -> dict[str, bytes]:
    """Flower's ``pull_objects``, giving up at the current collection's deadline (if any)."""
    if _deadline != float("inf"):
        kwargs["max_time"] = max(MIN_PULL_SECONDS, _deadline - time.time())
    return pull_objects(*args, **kwargs)


http_grid.pull_objects = pull_objects_until_deadline  # the name HttpGrid.pull_messages calls


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """``Grid.send_and_receive`` with a short poll: Flower 1.41's waits 3 s between pulls."""
    return collect_replies(grid, grid.push_messages(messages), timeout)


def collect_replies(grid: Grid, message_ids: Iterable[str], timeout: float) -> list[Message]:
    """Pull the replies to pushed messages until all are in or TIMEOUT seconds have passed."""
    global _deadline
    pending = set(message_ids)
    _deadline = time.time() + timeout
    replies: list[Message] = []
    try:
        while pending:
            past_deadline = time.time() >= _deadline  # checked before the pull: one more pull after it
            for reply in grid.pull_messages(list(pending)):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or past_deadline:
                break
            yield_to_clients()  # in a simulation, Flower's message polling shares this process (and the cores)
            time.sleep(REPLY_POLL_SECONDS)
    finally:
        _deadline = float("inf")
    return replies
