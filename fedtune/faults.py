"""What an agent may tell the coordinator about a failure: a code from a fixed list, no free text.

An exception message on an agent can hold its data path or raw cells of its private file,
so an error reply carries only a code, and the coordinator records only the fixed words
for it (``describe``). Codes 0-8 are Flower's ``ErrorCode``; fedtune adds its own above 100.
"""

from __future__ import annotations

from flwr.common.constant import ErrorCode

DATA_MISMATCH = 101  # the agent's data lacks the run's columns or labels: it leaves the federation
FOREIGN_APP = 102  # the run's app is not fedtune's: the agent ran nothing of it

DESCRIPTIONS = {
    DATA_MISMATCH: "its data does not match the run (columns or labels); the agent stopped",
    FOREIGN_APP: "refused a foreign app",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "client error (its training failed; details stay in the agent's log)",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "client error (could not load the ClientApp)",
    ErrorCode.MESSAGE_UNAVAILABLE: "client error (message unavailable)",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "no reply (the agent went away)",
    ErrorCode.NODE_UNAVAILABLE: "no reply (the agent is offline)",
    ErrorCode.CLIENT_APP_CRASHED: "client error (its ClientApp crashed)",
}


def describe(code: object) -> str:
    """Fixed words for an error code from an untrusted reply."""
    if isinstance(code, int) and code in DESCRIPTIONS:
        return DESCRIPTIONS[code]
    return "client error (unknown code)"
