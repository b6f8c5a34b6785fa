"""A client's reply, checked field by field and decoded into a typed ``ClientUpdate``.

Train replies carry ``arrays`` + ``layout`` (exactly the sent tensors, packed by core/wire.py)
or, from a ZO client uploading seeds, ``zo`` + ``zo-config`` (replayed into the same tensors)
or, from a ZO client's head probe, ``probe`` (the head alone, the rest is the broadcast), plus
``metrics`` (``num-examples`` and training metrics) and ``info`` (client name, frozen-tensor
checksum, mode, rank). Evaluate replies carry ``metrics``. What each reply must hold this round
(the names and shapes, the frozen checksum, how seeds replay) is the strategy's to say: it is
``ReplyRules``, a strategy's base.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedtune.core import faults, spsa, wire
from fedtune.core.flower_internals import log
from fedtune.core.plan import ParameterPlan, role_of
from fedtune.core.secagg import SecAggError

Tensors = dict[str, torch.Tensor]


# -- checks of untrusted reply fields ---------------------------------------------------
# Every reply is a client's say-so. Each field fedtune reads is checked against a fixed rule
# before use; a rejection names the field and the rule, never the client's value or text
# (reasons go to metrics.jsonl, and an agent's error text can hold its private paths and data).

MAX_EXAMPLES = 10**9  # a client's num-examples: far above any partition, far below float trouble
MAX_STEPS = 10**7  # local steps a client reports for one round
MAX_MODEL_LOADS = 10**6
MAX_RANK = 4096  # adapter.r's limit
WEIGHT_KEY = "num-examples"  # what a reply's weight is counted in
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
    return str(err) if isinstance(err, (ReplyError, wire.WireError, SecAggError)) else f"malformed reply ({type(err).__name__})"


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


class ReplyRules:
    """What the train replies of a strategy's round in progress must be (the strategy's base class): the
    tensors of its plan's sent roles in the global shapes, the frozen checksum, seeds and probes completed
    from the broadcast the clients decoded. A strategy with clients of other ranks overrides the shapes."""

    current: Tensors  # the round's global tensors
    broadcast: Tensors  # its broadcast as the clients decoded it
    round: int
    seed_limits: tuple[int, int] | None
    frozen_checksum: str | None

    def plan_for(self, server_round: int) -> ParameterPlan: ...

    def decode(self, content: RecordDict, node: int, name: str) -> ClientUpdate:
        return decode_update(content, node, name, self)

    def uploaded_names(self) -> list[str]:
        """The tensors a train reply of the round in progress carries: its plan's sent roles."""
        return [name for name in self.current if role_of(name) in self.plan_for(self.round).sent]

    def expected_shapes(self, info: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.current[n].shape) for n in self.uploaded_names()}

    def lifted(self, tensors: Tensors, info: Mapping[str, object]) -> Tensors:
        """A checked reply's tensors in the coordinator's own shapes (they already are, with one rank)."""
        return tensors

    def probed_head(self, arrays: ArrayRecord) -> Tensors:
        uploaded = self.uploaded_names()
        heads = {n: tuple(self.current[n].shape) for n in uploaded if role_of(n) == "head"}
        return probed_head(arrays, heads, {n: self.broadcast[n] for n in uploaded})

    def replay_seeds(self, arrays: ArrayRecord, config: ConfigRecord) -> Tensors:
        trained = self.plan_for(self.round).trained
        shapes = {n: tuple(v.shape) for n, v in self.current.items() if role_of(n) in trained}
        uploaded = {n: self.broadcast[n] for n in self.uploaded_names()}
        return replayed_seeds(arrays, config, uploaded, shapes, self.seed_limits)

    def max_reply_bytes(self, message_type: str) -> int:
        """The most a reply to this round's MESSAGE_TYPE instructions may weigh: every sent tensor in
        float32 (the widest codec), or the run's most ZO seeds, plus its records (evaluate: records only)."""
        if message_type != MessageType.TRAIN:
            return REPLY_RECORDS_BYTES
        payloads = [4 * sum(self.current[name].numel() for name in self.uploaded_names())]
        if self.seed_limits is not None:
            payloads.append(wire.seed_payload_bytes(*self.seed_limits))
        return REPLY_RECORDS_BYTES + max(payloads)


def decode_update(content: RecordDict, node: int, name: str, rules: ReplyRules) -> ClientUpdate:
    """A train reply checked against RULES: every metric and info field, then names, shapes and finite
    values (``ReplyError`` or ``wire.WireError`` naming the first fault otherwise).

    Tensors are decoded last, and only when the layout promises exactly the tensors the rules expect.
    """
    sent = [key for key in UPDATE_RECORDS if key in content.array_records]
    complete = len(sent) == 1 and UPDATE_RECORDS[sent[0]] in (None, *content.config_records)
    if not complete or "metrics" not in content.metric_records:
        raise ReplyError("needs a 'metrics' record and one update: 'arrays' + 'layout', ZO 'zo' + 'zo-config' or 'probe'")
    num_examples, metrics, info = _checked_fields(content, rules)
    if sent == ["zo"]:
        tensors = rules.replay_seeds(content["zo"], content["zo-config"])
    elif sent == [wire.HEAD_PROBE]:
        tensors = rules.probed_head(content[wire.HEAD_PROBE])
    else:
        tensors = wire.decode(content["arrays"], content["layout"], rules.expected_shapes(info))
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ReplyError(f"{key}: contains NaN or Inf")
    tensors = {k: v.float() for k, v in tensors.items()}
    return ClientUpdate(node, name, rules.lifted(tensors, info), int(num_examples), metrics, info)


def decode_masked(content: RecordDict, node: int, name: str, rules: ReplyRules, length: int) -> tuple[ClientUpdate, np.ndarray, list[int]]:
    """A secure-aggregation train reply: its fields checked as ``decode_update`` checks them, its masked
    vector of LENGTH uint32 values, and the peers whose envelopes did not open for it."""
    if not {"masked"} <= set(content.array_records) or "metrics" not in content.metric_records or "secagg" not in content.config_records:
        raise ReplyError("a secure-aggregation reply needs 'masked', 'metrics' and 'secagg' records")
    num_examples, metrics, info = _checked_fields(content, rules)
    vector = wire.read_array(content["masked"], "values", "uint32", length)
    bad = content["secagg"].get("bad", [])
    if not (isinstance(bad, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in bad)):
        raise ReplyError("'bad' must be a list of node ids")
    return ClientUpdate(node, name, {}, int(num_examples), metrics, info), vector, bad


def _checked_fields(content: RecordDict, rules: ReplyRules) -> tuple[int, dict[str, float], dict[str, str | int | float]]:
    """A train reply's example count, metrics and info, each checked; and its frozen tensors' checksum."""
    metrics = dict(content["metrics"])
    num_examples = int(COUNT.check(WEIGHT_KEY, metrics.pop(WEIGHT_KEY, None)))
    metrics = checked_metrics(metrics, TRAIN_METRICS)
    info = checked_info(content)
    if rules.frozen_checksum is not None and info.get("frozen-checksum") != rules.frozen_checksum:
        raise ReplyError("frozen tensors differ from the shared init (checksum mismatch)")
    return num_examples, metrics, info


def decodable(replies: Iterable[Message], decode: Callable[[RecordDict, int, str], ClientUpdate]) -> list[ClientUpdate]:
    """The replies DECODE accepts, named as they claim (no session to bind names: a strategy used on its own)."""
    accepted = []
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            if not reply.has_error():
                accepted.append(decode(reply.content, node, client_name(reply.content, f"node {node}")))
        except Exception as err:  # one client's reply must never fail the round
            log(WARNING, "rejected reply from node %d: %s", node, fault(err))
    return accepted


def probed_head(arrays: ArrayRecord, heads: Mapping[str, tuple[int, ...]], start: Tensors) -> Tensors:
    """A head-probe reply's tensors: START (the client's broadcast), with the head it fitted (its only upload)."""
    if sorted(len(shape) for shape in heads.values()) != [1, 2] or len({s[0] for s in heads.values()}) != 1:
        raise ReplyError(f"'{wire.HEAD_PROBE}': this strategy shares no head of one linear layer with a bias")
    return {**start, **wire.decode_head_probe(arrays, heads)}


def replayed_seeds(
    arrays: ArrayRecord,
    config: ConfigRecord,
    start: Tensors,
    shapes: Mapping[str, tuple[int, ...]],
    limits: tuple[int, int] | None,
) -> Tensors:
    """A ZO client's tensors, rebuilt from its seeds and START (the broadcast it decoded); only in a run with
    seed uploads (LIMITS), and no more steps and perturbations than the run's ZO clients make."""
    if limits is None:
        raise ReplyError("ZO seed uploads: not in this run (client.zo_upload is delta)")
    steps, weight_decay = wire.decode_seeds(arrays, config, *limits)
    return spsa.replay(start, shapes, steps, weight_decay)


def decode_evaluation(content: RecordDict) -> tuple[int, dict[str, float]]:
    """(examples, metrics) of an evaluate reply; ``ReplyError`` names the first bad field."""
    if "metrics" not in content.metric_records:
        raise ReplyError("missing 'metrics' record")
    metrics = dict(content["metrics"])
    count = EVAL_COUNT.check(WEIGHT_KEY, metrics.pop(WEIGHT_KEY, None))
    return int(count), checked_metrics(metrics, {})


def spent_epsilon(content: RecordDict) -> float:
    """The ε a DP-SGD client at its budget reports (∞ when it reports none)."""
    metrics = content["metrics"] if "metrics" in content.metric_records else {}
    return TRAIN_METRICS["epsilon"].check("epsilon", metrics.get("epsilon", math.inf))


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
