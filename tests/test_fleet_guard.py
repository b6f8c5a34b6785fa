"""The public listener's own bookkeeping (coordinator/fleet_guard.py), without a network.

Each test names the attack of the post-issue-31 review (an attacker's-view session) it covers.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedtune.coordinator.fleet_guard import Connections, ListenerLimits, RateLimitedLog
from fedtune.strategies.fedit import FedIT
from flower_helpers import StaticGrid, enter_run


class Closable:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_full_table_evicts_the_oldest_connection_that_never_signed():
    """Outsiders holding every slot from many addresses locked agents out (0 of 12 TLS connections)."""
    table = Connections(ListenerLimits(max_connections=3, max_connections_per_peer=2))
    a, b, c, agent, late = (Closable() for _ in range(5))
    for address, connection in ((("127.0.0.2", 1), a), (("127.0.0.3", 1), b), (("127.0.0.4", 1), c)):
        assert table.admit(address, connection)
    table.mark_signed(("127.0.0.3", 1))  # b made a signed request
    assert table.admit(("127.0.0.1", 7), agent) and a.closed and not b.closed  # the oldest unsigned made room
    table.mark_signed(("127.0.0.1", 7))
    assert table.admit(("127.0.0.5", 1), late) and c.closed and not agent.closed
    table.mark_signed(("127.0.0.5", 1))
    assert not table.admit(("127.0.0.6", 1), Closable())  # every slot signed: no one is evicted
    per_peer = Connections(ListenerLimits(max_connections=10, max_connections_per_peer=2))
    assert per_peer.admit(("127.0.0.2", 1), Closable()) and per_peer.admit(("127.0.0.2", 2), Closable())
    assert not per_peer.admit(("127.0.0.2", 3), Closable())


def test_log_lines_with_a_request_s_fields_are_one_kind():
    """Flower logs some errors pre-formatted with request fields: each request was a new line (17.7 MB)."""
    limiter = RateLimitedLog()
    passed = 0
    for index in range(300):
        text = f"[/v1/fleet/get-fab][ApiError:2009] SuperNode {index}, fab_hash={'A' * 60000}{index}"
        record = logging.LogRecord("flwr", logging.ERROR, __file__, 0, text, (), None)
        if limiter.filter(record):
            passed += 1
            assert len(record.getMessage()) < 400
    assert passed == 1 and len(limiter.last) == 1


def test_every_record_of_an_instruction_carries_a_fresh_nonce():
    """A layout and a round's config were predictable, so an agent could register their ids first with
    children that never arrive, and stall every client in the next round."""
    enter_run()
    strategy = FedIT(min_clients=1)
    tensors = {"m.q.lora_A.weight": torch.zeros(2, 4), "m.q.lora_B.weight": torch.zeros(4, 2)}
    rounds = [strategy.configure_train(r, ArrayRecord(tensors), ConfigRecord(), StaticGrid([5])) for r in (1, 2)]
    nonces = [{m.content[k]["nonce"] for k in m.content.config_records} for (m,) in rounds]
    assert all(len(n) == 1 for n in nonces) and nonces[0] != nonces[1]
    assert rounds[0][0].content["layout"].object_id != rounds[1][0].content["layout"].object_id
