"""Flower's ``flower-supernode``, with a short idle poll.

Flower 1.41's SuperNode sleeps 3 s after every empty pull from the SuperLink and 0.5 s
between checks of its own state for a finished reply, both hard-coded. A round sends
each client two messages (train, evaluate), so on a fast round those sleeps were most of
the difference between deployment and simulation (BENCHMARKS.md, "Deployment
overhead"). This entry point caps the network poll at ``POLL_SECONDS`` and the local
checks at ``LOCAL_POLL_SECONDS``, and otherwise is Flower's own SuperNode, unchanged.
The price is one small pull request per agent every ``POLL_SECONDS`` while idle.

    python -m client.supernode <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

POLL_SECONDS = 0.25  # an empty pull from the SuperLink (over the network)
LOCAL_POLL_SECONDS = 0.02  # waiting for the ClientApp's reply in the SuperNode's own state


class _ShortSleeps:
    """Stands in for the ``time`` module inside the SuperNode loop (it only calls ``sleep``).

    Flower sleeps 3 s after an empty network pull and 0.5 s between local checks.
    """

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_SECONDS if seconds >= 1 else LOCAL_POLL_SECONDS))


if __name__ == "__main__":
    start_client_internal.time = _ShortSleeps
    sys.argv[0] = "flower-supernode"
    flower_supernode()
