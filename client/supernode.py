"""Flower's ``flower-supernode``, with a short idle poll and a quicker heartbeat.

Flower 1.41's SuperNode sleeps 3 s after every empty pull from the SuperLink and 0.5 s
between checks of its own state for a finished reply, both hard-coded. A round sends
each client two messages (train, evaluate), so on a fast round those sleeps were most of
the difference between deployment and simulation (BENCHMARKS.md, "Deployment
overhead"). This entry point caps the network poll at ``POLL_SECONDS`` and the local
checks at ``LOCAL_POLL_SECONDS``. It also declares a heartbeat interval of
``HEARTBEAT_SECONDS`` (Flower's minimum) instead of 30 s: the SuperLink treats a node as
gone after two missed intervals, so a dead agent stops holding up its round after ~20 s
instead of ~60 s. Otherwise it is Flower's own SuperNode, unchanged. The price is one
small pull request per agent every ``POLL_SECONDS`` while idle and a heartbeat every ~4 s.

    python -m fedtune.client.supernode <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time

from fedtune.core import flower_internals as flower
from fedtune.core.flower_internals import HEARTBEAT_MIN_INTERVAL

POLL_SECONDS = 0.25  # an empty pull from the SuperLink (over the network)
LOCAL_POLL_SECONDS = 0.02  # waiting for the ClientApp's reply in the SuperNode's own state
HEARTBEAT_SECONDS = HEARTBEAT_MIN_INTERVAL  # 10 s; the interval the node declares and keeps


class _ShortSleeps:
    """Stands in for the ``time`` module inside the SuperNode loop (it only calls ``sleep``).

    Flower sleeps 3 s after an empty network pull and 0.5 s between local checks.
    """

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_SECONDS if seconds >= 1 else LOCAL_POLL_SECONDS))


if __name__ == "__main__":
    flower.supernode_loop.time = _ShortSleeps
    flower.supernode_fleet.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # declared to the SuperLink
    flower.heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # the sender's cadence
    sys.argv[0] = "flower-supernode"
    flower.supernode_cli.flower_supernode()
