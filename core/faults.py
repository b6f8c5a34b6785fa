"""What an agent may tell the coordinator about a failure: a code from a fixed list, no free text.

An exception message on an agent can hold its data path or raw cells of its private file,
so an error reply carries only a code, and the coordinator records only the fixed words
for it (``describe``). Codes 0-8 are Flower's ``ErrorCode``; fedtune adds its own above 100 (110+: the coordinator's
verdicts on replies it refused before reading them).
"""

from __future__ import annotations

from fedtune.core.flower_internals import ErrorCode

DATA_MISMATCH = 101  # the agent's data lacks the run's columns or labels: it leaves the federation
FOREIGN_APP = 102  # the run's app is not fedtune's: the agent ran nothing of it
# The coordinator's own verdicts on a reply it refused before reading it (coordinator/replies.py)
OVERSIZED = 111  # its objects declare or weigh more than the plan allows
MALFORMED = 112  # its objects do not form the message it declared
MESSAGE_UNAVAILABLE = ErrorCode.MESSAGE_UNAVAILABLE  # registered, not uploaded by the deadline

DESCRIPTIONS = {
    DATA_MISMATCH: "its data does not match the run (columns or labels); the agent stopped",
    FOREIGN_APP: "refused a foreign app",
    OVERSIZED: "reply refused unread (larger than the plan allows)",
    MALFORMED: "reply refused (its objects do not form the message it declared)",
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
