"""Building Flower Messages in unit tests, without a running SuperLink."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.core import wire


class StaticGrid:
    """The part of Flower's Grid a strategy uses to sample: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def enter_run() -> None:
    """Messages need a run identity; a SuperLink would provide it."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def reply(
    to: Message, tensors: dict[str, torch.Tensor], num_examples: int = 10, name: str = "c", **info: str
) -> Message:
    content = RecordDict(
        {
            **wire.encode(tensors),
            "metrics": MetricRecord({"num-examples": num_examples, "train_loss": 0.5}),
            "info": ConfigRecord({"name": name, **info}),
        }
    )
    return Message(content=content, reply_to=to)


def tensors_of(message: Message) -> dict[str, torch.Tensor]:
    """The adapter tensors a message carries, decoded as a receiver would."""
    return wire.decode(message.content["arrays"], message.content["layout"])


def play_round(strategy, replies: list[Message], round_number: int = 1, budget_replies: bool = False, identity=None):
    """The coordinator's handling of one round's train replies: a session receives each, then aggregates.

    Returns (arrays, metrics, ledger); ledger says what was accepted, rejected and why."""
    from fedtune.coordinator.identity import NodeNames
    from fedtune.coordinator.session import Session

    session = Session(strategy, identity or NodeNames(), budget_replies)
    for reply in replies:
        session.receive_train(reply)
    arrays, metrics = session.aggregate(round_number)
    return arrays, metrics, session.ledger


def play_evaluation(strategy, replies: list[Message], round_number: int = 1):
    """(client metrics, ledger) of a round's evaluate replies, as the coordinator's session counts them."""
    from fedtune.coordinator.identity import NodeNames
    from fedtune.coordinator.session import Session

    session = Session(strategy, NodeNames(), False)
    return session.evaluation(round_number, replies), session.ledger
