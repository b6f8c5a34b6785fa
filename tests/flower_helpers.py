"""Building Flower Messages in unit tests, without a running SuperLink."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune import wire


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
