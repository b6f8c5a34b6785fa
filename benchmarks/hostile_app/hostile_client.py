"""fedtune's ClientApp, except that the partitions named in ``FEDTUNE_ATTACKS`` lie.

``FEDTUNE_ATTACKS`` is JSON mapping a partition id to an attack, e.g.
``{"0": "liar", "1": "signflip"}``. Each hostile client trains honestly with fedtune's
handler, then rewrites its train reply (broadcast = the tensors the round sent it):

- ``liar``: ``num-examples`` × 10⁶ (at most 10⁹, the most a reply may claim) and every
  sent tensor set to 0.5 (a poisoned model claiming most of the federation's data);
- ``signflip``: (sent − broadcast) × (−10⁴) + broadcast;
- ``huge``: (sent − broadcast) × 10⁶ + broadcast.

Evaluation replies are left alone.
"""

import json
import os

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import client_app
from fedtune.core import wire

app = ClientApp()

LIAR_FACTOR = 10**6
MAX_EXAMPLES = 10**9  # strategies/updates.py rejects a reply claiming more
SIGNFLIP = -1e4
HUGE = 1e6


def attack_of(context: Context) -> str | None:
    attacks = json.loads(os.environ.get("FEDTUNE_ATTACKS") or "{}")
    attack = attacks.get(str(context.node_config.get("partition-id")))
    if attack not in (None, "liar", "signflip", "huge"):
        raise ValueError(f"FEDTUNE_ATTACKS: unknown attack {attack!r} (liar, signflip, huge)")
    return attack


def poison(attack: str, sent: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if attack == "liar":
        return {name: torch.full_like(value, 0.5) for name, value in sent.items()}
    factor = {"signflip": SIGNFLIP, "huge": HUGE}[attack]
    return {name: (value - broadcast[name]) * factor + broadcast[name] for name, value in sent.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    attack = attack_of(context)
    if attack is None or "arrays" not in reply.content.array_records:
        return reply
    broadcast = wire.decode(msg.content["arrays"], msg.content["layout"])
    sent = wire.decode(reply.content["arrays"], reply.content["layout"])
    metrics = dict(reply.content["metrics"])
    if attack == "liar":
        metrics["num-examples"] = min(int(metrics["num-examples"]) * LIAR_FACTOR, MAX_EXAMPLES)
    codec = str(msg.content["config"]["compression"])
    content = RecordDict(
        {
            **wire.encode(poison(attack, sent, broadcast), codec),
            "metrics": MetricRecord(metrics),
            "info": reply.content["info"],
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)
