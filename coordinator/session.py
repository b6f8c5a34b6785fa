"""The federation as the coordinator keeps it: who is who, who has retired, what a round accepted.

The strategy knows what a reply must be and how to combine accepted ones; the session knows
which node may use which name (coordinator/identity.py), which clients spent their privacy
budget (not sampled to train again), and this round's ledger: bytes, every reply it accepted
or rejected and why (a fixed vocabulary: rejection reasons name the field and the rule, never
the client's value or text, since they go to metrics.jsonl), and what the aggregation did.
No reply fails a round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedtune.coordinator.identity import NodeNames
from fedtune.core.flower_internals import log
from fedtune.core.wire import payload_bytes
from fedtune.strategies import ClientLevelDP, LoraStrategy
from fedtune.strategies.base import Aggregate
from fedtune.strategies.updates import (
    ClientUpdate,
    NamedReplyError,
    ReplyError,
    checked_info,
    client_error,
    client_name,
    decode_evaluation,
    fault,
    spent_epsilon,
)


@dataclass
class RoundLedger:
    """What happened on the wire in the current round."""

    bytes_down: int = 0
    bytes_up: int = 0
    sent_to: int = 0
    replies: int = 0
    rejected: list[str] = field(default_factory=list)  # "name: reason"
    eval_rejected: list[str] = field(default_factory=list)  # evaluate replies not counted: "name: reason"
    updates: list[ClientUpdate] = field(default_factory=list)
    budget_spent: dict[str, float] = field(default_factory=dict)  # sample-level DP: name -> ε it stopped at
    silent: set[int] = field(default_factory=set)  # nodes that did not answer training by the deadline
    stats: dict[str, Any] = field(default_factory=dict)  # how the aggregate was made (robust, client-level DP)


class NodeView:
    """The part of a Grid a strategy samples from, less the nodes it must not ask."""

    def __init__(self, grid: Grid, excluded: Iterable[int]) -> None:
        self.grid, self.excluded = grid, set(excluded)

    def get_node_ids(self) -> list[int]:
        return [node for node in self.grid.get_node_ids() if node not in self.excluded]


class Session:
    def __init__(self, strategy: LoraStrategy | ClientLevelDP, identity: NodeNames, budget_replies: bool) -> None:
        self.strategy, self.identity = strategy, identity
        self.budget_replies = budget_replies  # sample-level DP: clients may reply "privacy budget spent"
        self.retired: set[str] = set()  # clients whose privacy budget is spent: not sampled to train
        self.suspended: set[int] = set()  # nodes kept out of the round's further attempts (secure aggregation)
        self.ledger = RoundLedger()

    def trainers(self, grid: Grid) -> NodeView:
        """The nodes a round may sample to train: all but the retired clients'."""
        retired = [node for node, name in self.identity.bound.items() if name in self.retired]
        return NodeView(grid, [*retired, *self.suspended])

    def evaluators(self, grid: Grid) -> NodeView:
        """The nodes a round may ask to evaluate: all but those silent in its training."""
        return NodeView(grid, self.ledger.silent)

    def start_round(self, messages: list[Message]) -> None:
        self.ledger = RoundLedger(bytes_down=sum(payload_bytes(m.content) for m in messages), sent_to=len(messages))

    def receive_train(self, reply: Message) -> None:
        """Decode a train reply into the ledger, or record why it was rejected."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.reject(self.identity.name(node), client_error(reply.error.code))
            return
        self.ledger.replies += 1
        name = self.identity.name(node)
        try:
            self.ledger.bytes_up += payload_bytes(reply.content)
            name = self.identify(node, reply)
            if self.budget_spent(reply, name):
                return
            self.ledger.updates.append(self.strategy.decode(reply.content, node, name))
        except Exception as err:  # one client's reply must never fail the round
            self.reject(getattr(err, "name", name), fault(err))

    def budget_spent(self, reply: Message, name: str) -> bool:
        """Whether REPLY says its DP-SGD client is at its budget (then recorded: it trains no more)."""
        if "privacy-spent" not in checked_info(reply.content) or not self.budget_replies:
            return False
        self.ledger.budget_spent[name] = spent_epsilon(reply.content)
        self.ledger.rejected.append(f"{name}: privacy budget spent")  # the client's own text is not recorded
        return True

    def aggregate(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The strategy's aggregate of the accepted updates; what it did goes to the ledger."""
        return self.settle(self.strategy.aggregate(server_round, self.ledger.updates))

    def settle(self, outcome: Aggregate) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A round attempt's outcome; what the aggregation did goes to the ledger."""
        self.ledger.stats = outcome.stats
        if outcome.problem:
            self.ledger.rejected.append(outcome.problem)
        return outcome.arrays, outcome.metrics

    def evaluation(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' evaluation metrics from the replies that may count; the others are listed."""
        results = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            name = self.identity.name(node)
            try:
                if reply.has_error():
                    raise ReplyError(client_error(reply.error.code))
                name = self.identify(node, reply)
                results[name] = decode_evaluation(reply.content)
            except Exception as err:  # one client's reply must never fail the round
                reason = fault(err)
                self.ledger.eval_rejected.append(f"{getattr(err, 'name', name)}: {reason}")
                log(WARNING, "round %d: evaluate reply from %s not counted: %s", server_round, name, reason)
        return self.strategy.evaluation_metrics([results[name] for name in sorted(results)])  # arrival order must not matter

    def identify(self, node: int, reply: Message) -> str:
        """The reply's name, if its node may use it (``NamedReplyError`` naming the node's own name otherwise)."""
        claimed = client_name(reply.content, f"node {node}")
        if problem := self.identity.check(node, claimed):
            raise NamedReplyError(self.identity.name(node), problem)
        return claimed

    def reject(self, name: str, reason: str) -> None:
        self.ledger.rejected.append(f"{name}: {reason}")
        log(WARNING, "rejected reply from %s: %s", name, reason)
