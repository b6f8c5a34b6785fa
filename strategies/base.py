"""What every LoRA strategy shares: sampling, the message format, reply checks, bytes.

A concrete strategy sets ``plan`` (which adapter roles are trained, sent, private,
frozen) and implements ``combine``: pure tensor math from the clients' sent tensors
to the new global values of those tensors. Everything Flower-specific lives here, in
the four Message-API hooks, so the math modules stay testable without Flower.

Message format. Train/evaluate messages carry ``arrays`` + ``layout`` (the global
tensors of the sent roles, peft-named, packed by fedtune/wire.py with the run's codec)
and ``config`` (round, codec, the plan), plus ``residual`` + ``residual-layout`` when the
global state holds base residuals (FLoRA, FedEx-LoRA). Train replies carry ``arrays`` +
``layout`` (exactly the sent tensors) or, from a ZO client uploading seeds, ``zo`` +
``zo-config`` (replayed here into the same tensors) or, from a ZO client's head probe,
``probe`` (the head alone, wire.encode_head_probe; the rest is the broadcast), plus ``metrics``
(``num-examples`` and training metrics) and ``info`` (client name, frozen-tensor checksum, mode).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedtune import faults, spsa, wire
from fedtune.config import Config
from fedtune.plan import RESIDUAL, ParameterPlan, checksum, role_of
from fedtune.strategies.identity import NodeNames
from fedtune.strategies.robust import RobustSettings, aggregate_tensors, bound_updates, cap_weights
from fedtune.wire import payload_bytes

if TYPE_CHECKING:
    from fedtune.strategies.client_dp import ClientLevelDP

Tensors = dict[str, torch.Tensor]


# -- checks of untrusted reply fields ---------------------------------------------------
# Every reply is a client's say-so. Each field fedtune reads is checked against a fixed rule
# before use; a rejection names the field and the rule, never the client's value or text
# (reasons go to metrics.jsonl, and an agent's error text can hold its private paths and data).

MAX_EXAMPLES = 10**9  # a client's num-examples: far above any partition, far below float trouble
MAX_STEPS = 10**7  # local steps a client reports for one round
MAX_MODEL_LOADS = 10**6
MAX_RANK = 4096  # adapter.r's limit
REPLY_RECORDS_BYTES = 2**18  # a reply's metrics, info and layout records, and its objects' headers


class ReplyError(ValueError):
    """A reply field that fails its rule; the message names the field and the rule only."""


class NamedReplyError(ReplyError):
    """A reply from a node that claims a name it may not use; ``name`` is the node's own."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(problem)
        self.name = name


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric reply field; ``integer`` also admits integral floats (``3.0``)."""

    low: float
    high: float = math.inf
    integer: bool = False
    infinite: bool = False  # +inf admitted: the ε of a client that trains without noise

    def check(self, key: str, value: object) -> int | float:
        number = _as_float(value)
        if self.low <= number <= self.high and (self.infinite or math.isfinite(number)):
            if not self.integer:
                return number
            if number.is_integer():
                return int(number)
        raise ReplyError(f"'{key}' must be {self}")

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number" if self.infinite else "a finite number"
        return f"{kind} >= {self.low}" if self.high == math.inf else f"{kind} between {self.low} and {self.high}"


def _as_float(value: object) -> float:
    """An int or float field as a float; NaN (which fails every range) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.nan


COUNT = Bounds(1, MAX_EXAMPLES, integer=True)
EVAL_COUNT = Bounds(0, MAX_EXAMPLES, integer=True)  # 0: a client without held-out examples
TRAIN_METRICS = {  # what a train reply may report beside num-examples (client/client_app.py, client/trainers)
    "steps": Bounds(0, MAX_STEPS, integer=True),
    "train_s": Bounds(0),
    "epsilon": Bounds(0, infinite=True),  # sample-level DP; ∞ without noise (metrics.jsonl: null)
    "noise_multiplier": Bounds(0),
    "sample_rate": Bounds(0, 1),
    "zo_grad_abs": Bounds(0),
}
METRIC_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
SUFFIX_METRICS = {"accuracy": Bounds(0, 1), "loss": Bounds(0)}  # any well-formed key with these endings


def checked_metrics(record: Mapping[str, object], known: Mapping[str, Bounds]) -> dict[str, float]:
    """The metrics fedtune records, each in its range (``ReplyError`` otherwise); other keys are dropped."""
    metrics = {}
    for key, value in record.items():
        if key in known:
            metrics[key] = known[key].check(key, value)
            continue
        suffix = next((s for s in SUFFIX_METRICS if key.endswith(s)), None)
        if suffix and METRIC_KEY.fullmatch(key):
            metrics[key] = SUFFIX_METRICS[suffix].check(f"*{suffix}", value)
    return metrics


def _matching(pattern: str, rule: str) -> Callable[[str, object], str]:
    """A check of a text field against ``pattern``."""
    compiled = re.compile(pattern)

    def check(key: str, value: object) -> str:
        if isinstance(value, str) and compiled.fullmatch(value):
            return value
        raise ReplyError(f"'{key}' must be {rule}")

    return check


UPDATE_RECORDS = {"arrays": "layout", "zo": "zo-config", wire.HEAD_PROBE: None}  # a reply's update record -> its config

INFO_FIELDS: dict[str, Callable[[str, object], str | int | float]] = {
    "name": _matching(r"[\w.-]{1,64}", "1 to 64 letters, digits, '_', '.' or '-'"),
    "process": _matching(r"[\w.:-]{1,64}", "1 to 64 letters, digits, '_', '.', ':' or '-'"),
    "model-loads": Bounds(0, MAX_MODEL_LOADS, integer=True).check,
    "frozen-checksum": _matching(r"(?:[0-9a-f]{64})?", "64 lowercase hex digits or empty"),
    "mode": _matching(r"backprop|zo", "backprop or zo"),
    "rank": Bounds(1, MAX_RANK, integer=True).check,  # the client's LoRA rank (strategies/per_client_rank.py)
    "privacy-spent": _matching(r"(?s).{0,4096}", "a text of at most 4096 characters"),  # never copied
}


def client_name(content: RecordDict, default: str) -> str:
    """The name a reply gives in ``info``, checked (``ReplyError`` otherwise); ``default`` if it gives none."""
    info = content["info"] if "info" in content.config_records else {}
    return str(INFO_FIELDS["name"]("name", info["name"])) if "name" in info else default


def checked_info(content: RecordDict) -> dict[str, str | int | float]:
    """The ``info`` fields fedtune reads, each checked (``ReplyError`` otherwise); other keys are ignored."""
    info = content["info"] if "info" in content.config_records else {}
    return {key: check(key, info[key]) for key, check in INFO_FIELDS.items() if key in info}


def fault(err: Exception) -> str:
    """The reason for an exception raised while checking one reply: a failed rule, else only its type."""
    return str(err) if isinstance(err, (ReplyError, wire.WireError)) else f"malformed reply ({type(err).__name__})"


def client_error(code: object) -> str:
    """A client's error reply as a reason: fixed words for its code, never its text (paths, data values)."""
    return faults.describe(code)


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
    eval_rejected: list[str] = field(default_factory=list)  # evaluate replies not counted: "name: reason"
    updates: list[ClientUpdate] = field(default_factory=list)
    budget_spent: dict[str, float] = field(default_factory=dict)  # sample-level DP: name -> ε it stopped at
    update_norms: list[float] = field(default_factory=list)  # client-level DP: before clipping
    clip_norm: float | None = None  # client-level DP: the C this round's updates were clipped to
    clipped_updates: int = 0  # strategy.robust: updates scaled down to norm_bound × the median norm
    capped_weights: int = 0  # strategy.robust: num-examples lowered to max_weight_ratio × the median
    silent: set[int] = field(default_factory=set)  # nodes that did not answer training by the deadline: not asked to evaluate


class LoraStrategy(Strategy):
    """Base of fedtune's strategies (Flower Message-API ``Strategy``)."""

    name: ClassVar[str]  # strategy.name, and the key of STRATEGIES
    plan: ParameterPlan  # the roles clients train, send, keep private, keep frozen
    weighted_by_key = "num-examples"
    robust = RobustSettings()  # strategy.robust (frozen, so sharing the default is safe); build_strategy sets it

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
        self.identity = NodeNames()  # which name each node may use; the coordinator sets its registry
        self.privacy: ClientLevelDP | None = None  # client-level DP, set by build_strategy
        self.budget_replies = False  # sample-level DP: clients may reply "privacy budget spent"
        self.seed_limits: tuple[int, int] | None = None  # client.zo_upload seeds: (ZO steps, samples) a reply may hold
        self.retired: set[str] = set()  # clients whose privacy budget is spent: not sampled to train
        self._broadcast: Tensors = {}  # this round's sent tensors as clients decoded them

    @classmethod
    def from_config(cls, config: Config, **common: Any) -> LoraStrategy:
        """The strategy with COMMON settings and those of its own config section (``strategy.NAME``)."""
        return cls(**common)

    # -- method-specific math ------------------------------------------------------
    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """New global values of the sent tensors from the accepted client updates.

        FedIT, FFA-LoRA and FedSA-LoRA: the example-weighted mean of what clients send, or the
        coordinate-wise statistic that ``strategy.robust`` names (strategies/robust.py).
        """
        return aggregate_tensors([u.tensors for u in updates], [u.num_examples for u in updates], self.robust)

    def starts(self, updates: list[ClientUpdate]) -> list[Tensors]:
        """Where each client started this round (what its update is measured from): the broadcast."""
        return [self._broadcast] * len(updates)

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
            self.receive(reply)
        return self.aggregate(server_round)

    def aggregate(self, server_round: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's new global tensors from the replies received so far (``receive``)."""
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
        if self.privacy is None and self.robust.bounded:  # client-level DP's clip bounds every client itself
            counts = [u.num_examples for u in updates]
            bounded = bound_updates([u.tensors for u in updates], counts, self.starts(updates), self.robust)
            self.ledger.clipped_updates, self.ledger.capped_weights = bounded.clipped, bounded.capped
            bounds = zip(updates, bounded.tensors, bounded.weights)
            updates = [replace(update, tensors=t, num_examples=w) for update, t, w in bounds]
        metrics = MetricRecord(weighted_metrics([(u.num_examples, u.metrics) for u in updates]))
        new = dict(self.current)
        if self.privacy is None:
            new.update(self.combine(self.current, updates))
            return self._finite(new, metrics, server_round)
        # client-level DP: clip what each client releases, sum, add noise, average; combine from that alone
        self.ledger.clip_norm = self.privacy.clip_norm
        mean, self.ledger.update_norms = self.privacy.aggregate(self.released, updates, server_round)
        new.update(self.combine_released(self._broadcast, mean))
        self.privacy.adapt(self.ledger.update_norms, server_round)
        return self._finite(new, metrics, server_round)

    def _finite(
        self, new: Tensors, metrics: MetricRecord, server_round: int
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global tensors, or none when any is not finite: the previous model stays."""
        if all(torch.isfinite(value).all() for value in new.values()):
            return ArrayRecord(new), metrics
        self.ledger.rejected.append("aggregate: non-finite result")
        log(WARNING, "round %d: the aggregate is not finite; global adapter unchanged", server_round)
        return None, None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays.to_torch_state_dict()
        return self._messages(server_round, config, grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for reply in replies:
            node = reply.metadata.src_node_id
            name = self.identity.name(node)
            try:
                if reply.has_error():
                    raise ReplyError(client_error(reply.error.code))
                name = self._identify(node, reply.content)
                count, metrics = self._evaluation(reply.content)
            except Exception as err:  # one client's reply must never fail the round
                self._skip_evaluation(server_round, getattr(err, "name", name), fault(err))
                continue
            if count > 0:  # a client without held-out examples has nothing to count
                results.append((count, metrics))
        if results and self.robust.bounded:  # one client's count must not decide the published client metrics
            counts, _ = cap_weights([count for count, _ in results], self.robust.max_weight_ratio)
            results = [(count, metrics) for count, (_, metrics) in zip(counts, results)]
        return MetricRecord(weighted_metrics(results)) if results else None

    def _evaluation(self, content: RecordDict) -> tuple[int, dict[str, float]]:
        """(examples, metrics) of an evaluate reply; ``ReplyError`` names the first bad field."""
        if "metrics" not in content.metric_records:
            raise ReplyError("missing 'metrics' record")
        metrics = dict(content["metrics"])
        count = EVAL_COUNT.check(self.weighted_by_key, metrics.pop(self.weighted_by_key, None))
        return int(count), checked_metrics(metrics, {})

    def _skip_evaluation(self, server_round: int, name: str, reason: str) -> None:
        self.ledger.eval_rejected.append(f"{name}: {reason}")
        log(WARNING, "round %d: evaluate reply from %s not counted: %s", server_round, name, reason)

    # -- helpers -------------------------------------------------------------------
    def sent_names(self) -> list[str]:
        return [name for name in self.current if role_of(name) in self.plan.sent]

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, kind: str) -> list[Message]:
        nodes = sorted(grid.get_node_ids())
        if kind == MessageType.TRAIN:
            nodes = [node for node in nodes if self.identity.bound.get(node) not in self.retired]
        else:
            nodes = [node for node in nodes if node not in self.ledger.silent]
        if kind == MessageType.TRAIN and self.privacy is not None:
            chosen = self.privacy.sample(nodes, server_round)  # Poisson, secret: what the accountant assumes
        else:
            wanted = max(self.min_clients, math.ceil(self.fraction * len(nodes)))
            chosen = self.rng.sample(nodes, min(wanted, len(nodes)))
        config = ConfigRecord(
            {**dict(config), "round": server_round, "compression": self.compression, **self.plan.to_record()}
        )
        shared = wire.encode({name: self.current[name] for name in self.sent_names()}, self.compression)
        payloads = self.payloads(chosen, shared)
        residual = self.residual_payload()
        messages = []
        for node_id in chosen:
            content = RecordDict({**payloads[node_id], **residual, "config": config})
            messages.append(Message(content=content, message_type=kind, dst_node_id=node_id))
            if kind == MessageType.TRAIN:
                self.ledger.bytes_down += payload_bytes(content)
        if kind == MessageType.TRAIN:
            self.ledger.sent_to = len(messages)
            self._broadcast = wire.decode(**shared)  # the codec's rounding included: clients start here
        return messages

    def residual_payload(self) -> dict:
        """The base residuals in the global state (FLoRA, FedEx-LoRA), for every message; none without.
        Uncompressed: a rounded residual would make the clients' base differ from the one the coordinator
        evaluates and checkpoints, and the aggregation no longer exact."""
        residual = {name: value for name, value in self.current.items() if role_of(name) == RESIDUAL}
        if not residual:
            return {}
        packed = wire.encode(residual, "none")  # fp32 whatever the codec: clients must hold the server's base
        return {wire.RESIDUAL_ARRAYS: packed["arrays"], wire.RESIDUAL_LAYOUT: packed["layout"]}

    def payloads(self, nodes: list[int], shared: dict) -> dict[int, dict]:
        """What each chosen node receives: the SHARED encoding of the sent tensors, for every node."""
        return dict.fromkeys(nodes, shared)

    def max_reply_bytes(self, message_type: str) -> int:
        """The most a reply to this round's MESSAGE_TYPE instructions may weigh: every sent tensor in
        float32 (the widest codec), or the run's most ZO seeds, plus its records; evaluate replies carry
        metrics only."""
        if message_type != MessageType.TRAIN:
            return REPLY_RECORDS_BYTES
        payloads = [4 * sum(self.current[name].numel() for name in self.sent_names())]
        if self.seed_limits is not None:
            payloads.append(wire.seed_payload_bytes(*self.seed_limits))
        return REPLY_RECORDS_BYTES + max(payloads)

    def receive(self, reply: Message) -> None:
        """Decode a train reply into the ledger, or record why it was rejected; no reply fails the round."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            self._reject(self.identity.name(node), client_error(reply.error.code))
            return
        self.ledger.replies += 1
        name = self.identity.name(node)
        try:
            self.ledger.bytes_up += payload_bytes(reply.content)
            name = self._identify(node, reply.content)
            info = checked_info(reply.content)
            if "privacy-spent" in info and self.budget_replies:  # a DP-SGD client at its budget: not an error
                self._budget_spent(reply.content, node, name)
                return
            problem, update = self.decode(reply.content, node, name)
        except Exception as err:  # one client's reply must never fail the round
            problem, name = fault(err), getattr(err, "name", name)
        if problem:
            self._reject(name, problem)
            return
        self.ledger.updates.append(update)

    def _identify(self, node: int, content: RecordDict) -> str:
        """The reply's name, if its node may use it (``ReplyError`` naming the node's own name otherwise)."""
        claimed = client_name(content, f"node {node}")
        problem = self.identity.check(node, claimed)
        if problem:
            raise NamedReplyError(self.identity.name(node), problem)
        return claimed

    def _reject(self, name: str, reason: str) -> None:
        self.ledger.rejected.append(f"{name}: {reason}")
        log(WARNING, "rejected reply from %s: %s", name, reason)

    def _budget_spent(self, content: RecordDict, node: int, name: str) -> None:
        """Retire a client whose privacy budget is spent, at the ε it reports (∞ when it reports none)."""
        metrics = content["metrics"] if "metrics" in content.metric_records else {}
        self.ledger.budget_spent[name] = TRAIN_METRICS["epsilon"].check("epsilon", metrics.get("epsilon", math.inf))
        self.ledger.rejected.append(f"{name}: privacy budget spent")  # the client's own text is not recorded

    def decode(self, content: RecordDict, node: int, name: str) -> tuple[str | None, ClientUpdate | None]:
        """Check a reply against the plan: every metric and info field, then names, shapes and finite values.

        Tensors are decoded last, and only when the layout promises exactly the sent tensors.
        """
        sent = [key for key in UPDATE_RECORDS if key in content.array_records]
        complete = len(sent) == 1 and UPDATE_RECORDS[sent[0]] in (None, *content.config_records)
        if not complete or "metrics" not in content.metric_records:
            return "needs a 'metrics' record and one update: 'arrays' + 'layout', ZO 'zo' + 'zo-config' or 'probe'", None
        try:
            metrics = dict(content["metrics"])
            num_examples = COUNT.check(self.weighted_by_key, metrics.pop(self.weighted_by_key, None))
            metrics = checked_metrics(metrics, TRAIN_METRICS)
            info = checked_info(content)
            if self.frozen_checksum is not None and info.get("frozen-checksum") != self.frozen_checksum:
                return "frozen tensors differ from the shared init (checksum mismatch)", None
            if sent == ["zo"]:
                tensors = self.replay_seeds(content["zo"], content["zo-config"])
            elif sent == [wire.HEAD_PROBE]:
                tensors = self.probed_head(content[wire.HEAD_PROBE])
            else:
                tensors = wire.decode(content["arrays"], content["layout"], self.expected_shapes(info))
        except (ReplyError, wire.WireError) as err:
            return str(err), None
        for key, value in tensors.items():
            if not torch.isfinite(value).all():
                return f"{key}: contains NaN or Inf", None
        tensors = {k: v.float() for k, v in tensors.items()}
        return None, ClientUpdate(node, name, self.lifted(tensors, info), int(num_examples), metrics, info)

    def expected_shapes(self, info: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
        """The names and shapes a reply must send: the sent tensors, as the coordinator holds them."""
        return {n: tuple(self.current[n].shape) for n in self.sent_names()}

    def lifted(self, tensors: Tensors, info: Mapping[str, object]) -> Tensors:
        """A checked reply's tensors in the coordinator's own shapes (they already are, with one rank)."""
        return tensors

    def probed_head(self, arrays: ArrayRecord) -> Tensors:
        """A head-probe reply's sent tensors: the broadcast, with the head the client fitted (its only upload)."""
        heads = {n: tuple(self.current[n].shape) for n in self.sent_names() if role_of(n) == "head"}
        if sorted(len(shape) for shape in heads.values()) != [1, 2] or len({s[0] for s in heads.values()}) != 1:
            raise ReplyError(f"'{wire.HEAD_PROBE}': this strategy shares no head of one linear layer with a bias")
        return {**{n: self._broadcast[n] for n in self.sent_names()}, **wire.decode_head_probe(arrays, heads)}

    def replay_seeds(self, arrays: ArrayRecord, config: ConfigRecord) -> Tensors:
        """A ZO client's sent tensors, rebuilt from its seeds and the broadcast it started from; only in a run
        that configured seed uploads, and no more steps and perturbations than the run's ZO clients make."""
        if self.seed_limits is None:
            raise ReplyError("ZO seed uploads: not in this run (client.zo_upload is delta)")
        steps, weight_decay = wire.decode_seeds(arrays, config, *self.seed_limits)
        shapes = {n: tuple(v.shape) for n, v in self.current.items() if role_of(n) in self.plan.trained}
        return spsa.replay(self._broadcast, shapes, steps, weight_decay)

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
    """Example-weighted mean of each metric, plus the total ``num-examples``.

    Weights are normalised before they multiply, so large counts and values cannot overflow;
    a mean that is still not finite (an ε of ∞) is left out: metrics.jsonl is strict JSON.
    """
    merged: dict[str, float] = {}
    for key in sorted({k for _, metrics in results for k in metrics}):
        weight = sum(n for n, m in results if key in m)
        if weight > 0:
            mean = sum(n / weight * float(m[key]) for n, m in results if key in m)
            if math.isfinite(mean):
                merged[key] = mean
    merged["num-examples"] = sum(n for n, _ in results)
    return merged
