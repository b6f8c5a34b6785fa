"""A reply that is registered but never uploaded cannot hold a round past its deadline."""

from __future__ import annotations

import time

import flwr.superlink.grid.http_grid as http_grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

from fedtune.coordinator.replies import collect_replies


class StalledUploadGrid:
    """Pulls like Flower's HttpGrid: through ``http_grid.pull_objects``, for objects that never arrive."""

    def __init__(self) -> None:
        self.failures: list[ObjectPullError] = []

    def pull_messages(self, message_ids: list[str]) -> list:
        def never_uploaded(object_id: str) -> bytes:
            raise ObjectUnavailableError(object_id)

        try:
            http_grid.pull_objects(object_ids=["arrays"], pull_object_fn=never_uploaded)
        except ObjectPullError as error:  # HttpGrid turns this into a MESSAGE_UNAVAILABLE reply
            self.failures.append(error)
        return []


def test_a_never_uploaded_reply_gives_up_at_the_round_deadline():
    grid = StalledUploadGrid()
    started = time.monotonic()
    assert collect_replies(grid, ["m1"], timeout=2.0) == []
    waited = time.monotonic() - started
    assert grid.failures, "the pull never gave up"
    assert waited < 10.0, waited  # Flower alone would retry for the SuperLink's 180 s push session


def test_outside_a_collection_flower_keeps_its_own_bound(monkeypatch):
    seen = {}
    monkeypatch.setattr("fedtune.coordinator.replies.pull_objects", lambda *a, **k: seen.update(k) or {})
    http_grid.pull_objects(object_ids=[], pull_object_fn=lambda _: b"")
    assert "max_time" not in seen  # Flower's PULL_MAX_TIME applies


class LateReplyGrid(StalledUploadGrid):
    """One reply stalls the first pull past the deadline; another arrives meanwhile, fully uploaded."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pull_messages(self, message_ids: list[str]) -> list:
        self.calls += 1
        if self.calls == 1:
            return super().pull_messages(message_ids)  # holds until the deadline, then gives up
        return [Reply("m2")] if "m2" in message_ids else []


class Reply:
    def __init__(self, reply_to: str) -> None:
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()


def test_a_reply_that_arrived_during_a_stalled_pull_is_still_collected():
    grid = LateReplyGrid()
    replies = collect_replies(grid, ["m1", "m2"], timeout=1.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m2"] and grid.failures
