"""fedtune's ClientApp, except that the partitions named in ``FEDTUNE_ATTACKS`` lie.

``FEDTUNE_ATTACKS`` is JSON mapping a partition id to an attack, e.g.
``{"0": "liar", "1": "signflip"}``. Each hostile client trains honestly with fedtune's
handler, then rewrites its train reply (broadcast = the tensors the round sent it):

- ``liar``: ``num-examples`` × 10⁶ (at most 10⁹, the most a reply may claim) and every
  sent tensor set to 0.5 (a poisoned model claiming most of the federation's data);
- ``signflip``: (sent − broadcast) × (−10⁴) + broadcast;
- ``huge``: (sent − broadcast) × 10⁶ + broadcast;
- ``dropout``: trains, then fails before replying (a client lost mid-round); ``dropout-first``: only in
  round 1.

Under secure aggregation the poison goes in before masking (the client's own clip to ±c still
applies: the ``edge`` variants bypass it, as a member speaking the Fleet API can, and put every
coordinate at the edge of what the coordinator's range check lets through), and the liar claims
its count in the setup exchange, where counts travel. Evaluation replies are left alone.
"""

import json
import os

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import client_app
from fedtune.core import secagg, wire

app = ClientApp()

LIAR_FACTOR = 10**6
MAX_EXAMPLES = 10**9  # strategies/updates.py rejects a reply claiming more
SIGNFLIP = -1e4
HUGE = 1e6


def attack_of(context: Context) -> str | None:
    attacks = json.loads(os.environ.get("FEDTUNE_ATTACKS") or "{}")
    attack = attacks.get(str(context.node_config.get("partition-id")))
    if attack not in (None, *ATTACKS):
        raise ValueError(f"FEDTUNE_ATTACKS: unknown attack {attack!r} ({', '.join(ATTACKS)})")
    return attack


ATTACKS = ("liar", "signflip", "huge", "dropout", "dropout-first", "liar-edge", "signflip-edge")


def poison(attack: str, sent: dict[str, torch.Tensor], broadcast: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attack = attack.removesuffix("-edge")
    if attack == "liar":
        return {name: torch.full_like(value, 0.5) for name, value in sent.items()}
    factor = {"signflip": SIGNFLIP, "huge": HUGE}[attack]
    return {name: (value - broadcast[name]) * factor + broadcast[name] for name, value in sent.items()}


def edge_quantizer(clients: int):  # noqa: ANN201
    """Every coordinate at the edge of the coordinator's range check, in the poison's direction: as far
    as a sum of CLIENTS vectors may reach (N·T), less what the honest others' near-zero changes take
    (about T/2 each) and a margin for their spread."""
    high = (clients + 1) * secagg.TARGET_RANGE // 2 - secagg.TARGET_RANGE // 4

    def quantize(values: np.ndarray, clip: float, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        return np.where(values > 0, high, 0).astype(np.uint32), 0

    return quantize


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = attack_of(context)
    if attack == "dropout" or (attack == "dropout-first" and int(msg.content["config"]["round"]) == 1):
        client_app.train(msg, context)
        raise RuntimeError("hostile_client: dropped out after training")
    if attack in ("liar", "signflip", "huge", "liar-edge", "signflip-edge") and "secagg" in msg.content.config_records:
        return _masked_poison(attack, msg, context)
    reply = client_app.train(msg, context)
    if attack not in ("liar", "signflip", "huge") or "arrays" not in reply.content.array_records:
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


def _masked_poison(attack: str, msg: Message, context: Context) -> Message:
    """fedtune's secure-aggregation train reply, with the poisoned change masked in its place."""
    honest_masked, honest_quantize = client_app._masked, secagg.quantize  # noqa: SLF001

    def masked(node, sent, received, record, bad):  # noqa: ANN001, ANN202
        return honest_masked(node, poison(attack, sent, received), received, record, bad)

    client_app._masked = masked  # noqa: SLF001
    clients = len(msg.content["secagg"]["peers"])
    secagg.quantize = edge_quantizer(clients) if attack.endswith("-edge") else honest_quantize
    try:
        return client_app.train(msg, context)
    finally:
        client_app._masked, secagg.quantize = honest_masked, honest_quantize  # noqa: SLF001


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    reply = client_app.secagg_setup(msg, context)
    if (attack_of(context) or "").startswith("liar"):
        count = int(reply.content["metrics"]["num-examples"])
        reply.content["metrics"] = MetricRecord({"num-examples": min(count * LIAR_FACTOR, MAX_EXAMPLES)})
    return reply


@app.train("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    return client_app.secagg_share_keys(msg, context)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return client_app.secagg_unmask(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return client_app.evaluate(msg, context)
