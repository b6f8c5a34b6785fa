"""What every LoRA strategy shares: sampling, the message format, reply checks, bytes.

A concrete strategy sets ``plan`` (which adapter roles are trained, sent, private,
frozen) and implements ``combine``: pure tensor math from the clients' sent tensors
to the new global values of those tensors. Everything Flower-specific lives here, in
the four Message-API hooks, so the math modules stay testable without Flower.

Message format. Train/evaluate messages carry ``arrays`` + ``layout`` (the global
tensors of the sent roles, peft-named, packed by fedtune/wire.py with the run's codec)
and ``config`` (round, codec, the plan). Train replies carry ``arrays`` + ``layout``
(exactly the sent tensors) or, from a ZO client uploading seeds, ``zo`` + ``zo-config``
(replayed here into the same tensors), plus ``metrics`` (``num-examples`` and training
metrics) and ``info`` (client name, frozen-tensor checksum, mode).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune import wire, zo
from fedtune.plan import ParameterPlan, checksum, role_of

if TYPE_CHECKING:
    from strategies.privacy import ClientLevelDP

Tensors = dict[str, torch.Tensor]


def payload_bytes(content: RecordDict) -> int:
    """Bytes Flower transfers for a message's content: its deflated object tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


@dataclass
class ClientUpdate:
    """One accepted train reply, decoded."""

    node_id: int
    name: str
    tensors: Tensors
    num_examples: int
    metrics: dict[str, float]
    info: dict[str, str | int | float] = field(default_factory=dict)


@dataclass
class RoundLedger:
    """What happened on the wire in the current round (read by the coordinator)."""

    bytes_down: int = 0
    bytes_up: int = 0
    sent_to: int = 0
    replies: int = 0
    rejected: list[str] = field(default_factory=list)  # "name: reason"
    updates: list[ClientUpdate] = field(default_factory=list)
    budget_spent: dict[str, float] = field(default_factory=dict)  # sample-level DP: name -> ε it stopped at
    update_norms: list[float] = field(default_factory=list)  # client-level DP: before clipping
    clip_norm: float | None = None  # client-level DP: the C this round's updates were clipped to


class LoraStrategy(Strategy):
    """Base of fedtune's strategies (Flower Message-API ``Strategy``)."""

    plan: ParameterPlan
    weighted_by_key = "num-examples"

    def __init__(
        self, fraction: float = 1.0, min_clients: int = 2, sample_seed: int = 0, compression: str = "none"
    ) -> None:
        self.fraction = fraction
        self.compression = compression  # wire codec for broadcasts and uploads
        self.min_clients = min_clients
        self.rng = random.Random(sample_seed)  # client sampling, checkpointed for resume
        self.current: Tensors = {}
        self.frozen_checksum: str | None = None
        self.ledger = RoundLedger()
        self.node_names: dict[int, str] = {}  # for readable rejection reasons
        self.privacy: ClientLevelDP | None = None  # client-level DP, set by build_strategy
        self.budget_replies = False  # sample-level DP: clients may reply "privacy budget spent"
        self.retired: set[str] = set()  # clients whose privacy budget is spent: not sampled to train
        self._broadcast: Tensors = {}  # this round's sent tensors as clients decoded them

    # -- method-specific math ------------------------------------------------------
    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """New global values of the sent tensors from the accepted client updates."""
        raise NotImplementedError

    def released(self, update: ClientUpdate) -> Tensors:
        """What client-level DP clips and noises for one client: its change from the broadcast."""
        return {k: v - self._broadcast[k].float() for k, v in update.tensors.items()}

    def combine_released(self, start: Tensors, mean: Tensors) -> Tensors:
        """New global values from the noised mean of ``released`` (post-processing only)."""
        return {k: start[k].float() + mean[k] for k in start}

    # -- Flower Message-API hooks --------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── %s: fraction %.2f, min clients %d", type(self).__name__, self.fraction, self.min_clients)
        for key, roles in self.plan.to_record().items():
            log(INFO, "\t├── %s: %s", key, roles or "-")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        self.ledger = RoundLedger()
        if self.plan.frozen:  # frozen tensors never change: the global copy is the reference
            self.frozen_checksum = checksum({k: v for k, v in self.current.items() if role_of(k) in self.plan.frozen})
        return self._messages(server_round, config, grid, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            self._accept(reply)
        updates = sorted(self.ledger.updates, key=lambda u: u.name)  # arrival order must not change the sums
        if len(updates) < self.min_clients:
            log(
                WARNING,
                "round %d: %d usable replies < min_clients %d; global adapter unchanged",
                server_round,
                len(updates),
                self.min_clients,
            )
            return None, None
        metrics = MetricRecord(weighted_metrics([(u.num_examples, u.metrics) for u in updates]))
        new = dict(self.current)
        if self.privacy is None:
            new.update(self.combine(self.current, updates))
            return ArrayRecord(new), metrics
        # client-level DP: clip what each client releases, sum, add noise, average; combine from that alone
        self.ledger.clip_norm = self.privacy.clip_norm
        mean, self.ledger.update_norms = self.privacy.aggregate(self.released, updates, server_round)
        new.update(self.combine_released(self._broadcast, mean))
        self.privacy.adapt(self.ledger.update_norms, server_round)
        return ArrayRecord(new), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        return self._messages(server_round, config, grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for reply in replies:
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                continue
            metrics = dict(reply.content["metrics"])
            if metrics.get(self.weighted_by_key, 0) > 0:
                results.append((int(metrics.pop(self.weighted_by_key)), metrics))
        return MetricRecord(weighted_metrics(results)) if results else None

    # -- helpers -------------------------------------------------------------------
    def sent_names(self) -> list[str]:
        return [name for name in self.current if role_of(name) in self.plan.sent]

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, kind: str) -> list[Message]:
        nodes = sorted(grid.get_node_ids())
        if kind == MessageType.TRAIN:
            nodes = [node for node in nodes if self.node_names.get(node) not in self.retired]
        if kind == MessageType.TRAIN and self.privacy is not None:
            chosen = self.privacy.sample(nodes, server_round)  # Poisson, secret: what the accountant assumes
        else:
            wanted = max(self.min_clients, math.ceil(self.fraction * len(nodes)))
            chosen = self.rng.sample(nodes, min(wanted, len(nodes)))
        config = ConfigRecord(
            {**dict(config), "round": server_round, "compression": self.compression, **self.plan.to_record()}
        )
        payload = wire.encode({name: self.current[name] for name in self.sent_names()}, self.compression)
        messages = []
        for node_id in chosen:
            content = RecordDict({**payload, "config": config})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node_id))
            if kind == MessageType.TRAIN:
                self.ledger.bytes_down += payload_bytes(content)
        if kind == MessageType.TRAIN:
            self.ledger.sent_to = len(messages)
            self._broadcast = wire.decode(**payload)  # the codec's rounding included: clients start here
        return messages

    def _accept(self, reply: Message) -> None:
        """Decode a train reply into the ledger, or record why it was rejected."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            who = self.node_names.get(node, f"node {node}")
            self.ledger.rejected.append(f"{who}: client error: {reply.error.reason.strip()[:300]}")
            return
        self.ledger.replies += 1
        self.ledger.bytes_up += payload_bytes(reply.content)
        info = reply.content["info"] if "info" in reply.content.config_records else ConfigRecord()
        name = str(info.get("name", f"node {node}"))
        if "privacy-spent" in info and self.budget_replies:  # a DP-SGD client at its budget: not an error
            metrics = reply.content["metrics"] if "metrics" in reply.content.metric_records else {}
            self.ledger.budget_spent[name] = float(metrics.get("epsilon", math.nan))
            self.ledger.rejected.append(f"{name}: {info['privacy-spent']}")
            self.node_names[node] = name
            return
        problem, update = self.decode(reply.content, node, name)
        if problem:
            self.ledger.rejected.append(f"{name}: {problem}")
            log(WARNING, "rejected reply from %s: %s", name, problem)
            return
        self.node_names[node] = name
        self.ledger.updates.append(update)

    def decode(self, content: RecordDict, node: int, name: str) -> tuple[str | None, ClientUpdate | None]:
        """Check a reply against the plan: keys, shapes, finite values, a sample count."""
        seeds = "zo" in content.array_records and "zo-config" in content.config_records
        tensors_sent = "arrays" in content.array_records and "layout" in content.config_records
        if not (seeds or tensors_sent) or "metrics" not in content.metric_records:
            return "missing 'arrays' and 'layout' (or ZO 'zo' and 'zo-config'), or 'metrics' record", None
        metrics = dict(content["metrics"])
        num_examples = metrics.pop(self.weighted_by_key, None)
        if not isinstance(num_examples, (int, float)) or num_examples <= 0:
            return f"'{self.weighted_by_key}' must be a positive number (got {num_examples!r})", None
        try:
            if seeds:
                tensors = self.replay_seeds(content["zo"], content["zo-config"])
            else:
                tensors = wire.decode(content["arrays"], content["layout"])
        except wire.WireError as err:
            return str(err), None
        expected = set(self.sent_names())
        received = set(tensors)
        if received != expected:
            extra, missing = sorted(received - expected), sorted(expected - received)
            return f"wrong tensors (unexpected {extra[:3]}, missing {missing[:3]})", None
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(self.current[key].shape):
                return f"{key}: shape {tuple(value.shape)}, expected {tuple(self.current[key].shape)}", None
            if not torch.isfinite(value).all():
                return f"{key}: contains NaN or Inf", None
        if self.frozen_checksum is not None:
            theirs = content["info"].get("frozen-checksum") if "info" in content.config_records else None
            if theirs != self.frozen_checksum:
                return f"frozen tensors differ from the shared init (checksum {str(theirs)[:12]})", None
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        info = dict(content["info"]) if "info" in content.config_records else {}
        return None, ClientUpdate(
            node, name, {k: v.float() for k, v in tensors.items()}, int(num_examples), metrics, info
        )

    def replay_seeds(self, arrays: ArrayRecord, config: ConfigRecord) -> Tensors:
        """A ZO client's sent tensors, rebuilt from its seeds and the broadcast it started from."""
        steps, weight_decay = wire.decode_seeds(arrays, config)
        shapes = {n: tuple(v.shape) for n, v in self.current.items() if role_of(n) in self.plan.trained}
        return zo.replay(self._broadcast, shapes, steps, weight_decay)

    # -- state that must survive a coordinator restart ----------------------------
    def state_dict(self) -> dict:
        state = {"rng": self.rng.getstate()}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])


def weighted_metrics(results: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of each metric, plus the total ``num-examples``."""
    total = sum(n for n, _ in results)
    keys = sorted({k for _, metrics in results for k in metrics})
    merged = {
        k: sum(n * m[k] for n, m in results if k in m) / max(1, sum(n for n, m in results if k in m)) for k in keys
    }
    merged["num-examples"] = total
    return merged
