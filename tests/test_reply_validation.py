"""Client replies are untrusted input: every field is checked before use.

A malformed train or evaluate reply is rejected with a reason that names the client and
the kind of fault, never a value or text from the client; nothing a client sends fails
the round, and the global tensors and the recorded metrics stay finite (strict JSON).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.core import wire
from fedtune.core.config import Config
from fedtune.core.plan import RESIDUAL, ParameterPlan, role_of
from fedtune.core.spsa import ZOStep
from fedtune.strategies import STRATEGIES, build_strategy
from fedtune.strategies.base import LoraStrategy
from fedtune.strategies.fedit import FedIT
from fedtune.strategies.robust import cap_weights
from fedtune.strategies.updates import MAX_EXAMPLES, client_error, weighted_metrics
from flower_helpers import StaticGrid, enter_run, play_evaluation, play_round, reply, tensors_of

SHAPES = {
    "layer0.q.lora_A.weight": (2, 6),
    "layer0.q.lora_B.weight": (5, 2),
    "layer1.q.lora_A.weight": (2, 6),
    "layer1.q.lora_B.weight": (5, 2),
    "classifier.weight": (3, 5),
}
NODES = [1, 2, 3, 4, 5]
PRIVACY = {
    "none": {},
    "sample": {"mode": "sample", "noise_multiplier": 1.0},
    "client": {"mode": "client", "noise_multiplier": 1.0, "clip_norm": 1.0, "seed": 0},
}
SECRETS = ("/home/alice/private.tsv", "4111-1111", "333333333")  # what a client must not get into the ledger
COUNT_RULE = "'num-examples' must be an integer between 1 and 1000000000"


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in SHAPES.items()}


def _strategy(name: str = "fedit", privacy: str = "none", min_clients: int = 2, zo_upload: str = "seeds") -> LoraStrategy:
    config = Config.model_validate(
        {
            "strategy": {"name": name},
            "federation": {"clients": len(NODES), "min_clients": min_clients},
            "privacy": PRIVACY[privacy],
            "client": {"zo_upload": zo_upload, "zo_steps": 3, "zo_samples": 1},  # _zo_content's valid rounds
        }
    )
    return build_strategy(config)


def _seed_reply(message: Message, steps: int, samples: int) -> Message:
    records = wire.encode_seeds([ZOStep(0.01, list(range(samples)), [0.1] * samples)] * steps, 0.0)
    content = RecordDict({**records, "metrics": MetricRecord({"num-examples": 10}), "info": ConfigRecord({"name": "z"})})
    return Message(content=content, reply_to=message)


def test_seed_replies_count_only_where_configured_and_within_the_run_s_zo_steps():
    """Issue 31, finding 7: seeds were accepted in any run, up to 100,000 steps × 64 samples to replay."""
    for zo_upload, steps, samples, problem in [
        ("delta", 1, 1, "ZO seed uploads: not in this run"),
        ("seeds", 4, 1, "steps must be 1 to 3, samples 1 to 1"),
        ("seeds", 3, 2, "steps must be 1 to 3, samples 1 to 1"),
        ("seeds", 3, 1, None),
    ]:
        strategy = _strategy(min_clients=1, zo_upload=zo_upload)
        message = next(iter(_messages(strategy).values()))
        _, _, ledger = play_round(strategy, [_seed_reply(message, steps, samples)], 1)
        reasons = ledger.rejected
        assert any(problem in r for r in reasons) if problem else not reasons, (zo_upload, steps, samples, reasons)
        assert (problem is None) == bool(ledger.updates)


def _messages(strategy: LoraStrategy, nodes: list[int] = NODES) -> dict[int, Message]:
    enter_run()
    messages = strategy.configure_train(1, ArrayRecord(_adapter()), ConfigRecord(), StaticGrid(nodes))
    return {m.metadata.dst_node_id: m for m in messages}


def _good(strategy: LoraStrategy, message: Message, num_examples: int = 10, scale: float = 0.01) -> Message:
    node = message.metadata.dst_node_id
    uploaded = ParameterPlan.from_record(dict(message.content["config"])).sent  # what the round's plan sends back
    sent = {name: value + scale for name, value in tensors_of(message).items() if role_of(name) in uploaded}
    info = {"frozen-checksum": strategy.frozen_checksum or "", "mode": "backprop", "process": f"p{node}:1", "rank": 2}
    return reply(message, sent, num_examples, f"client-{node}", **info)


def _set_metric(message: Message, key: str, value: object) -> Message:
    """Any value, even one Flower's own type check would refuse: the checks must not rely on it."""
    message.content["metrics"].__dict__["_data"][key] = value
    return message


def _set_info(message: Message, key: str, value: object) -> Message:
    message.content["info"].__dict__["_data"][key] = value
    return message


def _error(message: Message, code: int = 0) -> Message:
    reason = f"ValueError: row 7 of {SECRETS[0]}: cannot parse '{SECRETS[1]}'"
    return Message(Error(code=code, reason=reason), reply_to=message)


def _evaluate_reply(to: Message, metrics: dict, name: str = "c") -> Message:
    content = RecordDict({"metrics": MetricRecord({}), "info": ConfigRecord({"name": name})})
    content["metrics"].__dict__["_data"].update(metrics)
    return Message(content=content, reply_to=to)


def _evaluate_messages(strategy: LoraStrategy) -> dict[int, Message]:
    enter_run()
    messages = strategy.configure_evaluate(1, ArrayRecord(_adapter()), ConfigRecord(), StaticGrid(NODES))
    return {m.metadata.dst_node_id: m for m in messages}


def _assert_no_secrets(reasons: list[str]) -> None:
    text = " ".join(reasons)
    assert not [secret for secret in SECRETS if secret in text], reasons


# -- one test per finding ---------------------------------------------------------------


@pytest.mark.parametrize("count", [math.inf, -math.inf, math.nan, 0.5, -3, 0, 10**12, 2**62, [10, 10]])
def test_a_bad_train_count_rejects_the_reply_and_never_the_round(count):
    strategy = _strategy(min_clients=2)
    messages = _messages(strategy, [1, 2])
    replies = [_good(strategy, messages[1]), _set_metric(_good(strategy, messages[2]), "num-examples", count)]
    arrays, metrics, ledger = play_round(strategy, replies, 1)
    assert (arrays, metrics) == (None, None)  # one usable reply < min_clients: the global adapter stays
    assert ledger.rejected == [f"client-2: {COUNT_RULE}"]
    assert [u.name for u in ledger.updates] == ["client-1"]


@pytest.mark.parametrize("count", [3.0, 7])
def test_integral_counts_are_accepted_as_integers(count):
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1])
    arrays, metrics, ledger = play_round(strategy, [_set_metric(_good(strategy, messages[1]), "num-examples", count)], 1)
    assert arrays is not None and metrics["num-examples"] == int(count)
    assert ledger.updates[0].num_examples == int(count)
    assert isinstance(ledger.updates[0].num_examples, int)


@pytest.mark.parametrize("count", [math.inf, math.nan, 0.5, -3, 10**12, [1, 2]])
def test_a_bad_evaluate_count_is_not_counted(count):
    strategy = _strategy()
    messages = _evaluate_messages(strategy)
    replies = [
        _evaluate_reply(messages[1], {"num-examples": 30, "accuracy": 0.5, "loss": 1.0}, "good"),
        _evaluate_reply(messages[2], {"num-examples": count, "accuracy": 1.0, "loss": 0.1}, "bad"),
        _evaluate_reply(messages[3], {"num-examples": 0, "accuracy": 0.0, "loss": 0.0}, "empty"),  # nothing held out
    ]
    result, ledger = play_evaluation(strategy, replies, 1)
    assert dict(result) == {"num-examples": 30, "accuracy": 0.5, "loss": 1.0}
    assert ledger.eval_rejected == [f"bad: {COUNT_RULE.replace('between 1', 'between 0')}"]


def test_a_layout_with_negative_dimensions_that_sum_to_the_payload_is_rejected():
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1, 2])
    forged = _good(strategy, messages[2])
    layout = forged.content["layout"]
    layout["shape"] = [-d for d in layout["shape"][:2]] + list(layout["shape"][2:])  # (-2, -6): still 12 values
    arrays, _, ledger = play_round(strategy, [_good(strategy, messages[1]), forged], 1)
    assert arrays is not None
    assert ledger.rejected == ["client-2: layout: ndims must be 0 to 8, dimensions non-negative"]


def test_a_nan_train_loss_rejects_the_reply_and_metrics_stay_strict_json():
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1, 2])
    replies = [_good(strategy, messages[1]), _set_metric(_good(strategy, messages[2]), "train_loss", math.nan)]
    arrays, metrics, ledger = play_round(strategy, replies, 1)
    assert arrays is not None and ledger.rejected == ["client-2: '*loss' must be a finite number >= 0"]
    json.dumps(dict(metrics), allow_nan=False)


def test_out_of_range_evaluate_metrics_are_not_counted():
    strategy = _strategy()
    messages = _evaluate_messages(strategy)
    replies = [
        _evaluate_reply(messages[1], {"num-examples": 10, "accuracy": 0.25, "loss": 2.0}, "a"),
        _evaluate_reply(messages[2], {"num-examples": 10, "client_accuracy": 333333333.69}, "b"),
        _evaluate_reply(messages[3], {"num-examples": 10, "loss": -1.0}, "c"),
    ]
    result, ledger = play_evaluation(strategy, replies, 1)
    assert dict(result) == {"num-examples": 10, "accuracy": 0.25, "loss": 2.0}
    assert ledger.eval_rejected == [
        "b: '*accuracy' must be a finite number between 0 and 1",
        "c: '*loss' must be a finite number >= 0",
    ]
    _assert_no_secrets(ledger.eval_rejected)


def test_unknown_metrics_are_dropped_not_recorded():
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1])
    good = _set_metric(_good(strategy, messages[1]), "secret_value", 4111.0)
    _set_metric(good, "Weird Key loss", 1.0)
    _, metrics, ledger = play_round(strategy, [good], 1)
    assert set(ledger.updates[0].metrics) == {"train_loss"}
    assert set(dict(metrics)) == {"train_loss", "num-examples"}


def test_a_payload_fifty_times_the_plan_is_rejected_before_it_is_read(monkeypatch):
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1, 2])
    honest = _good(strategy, messages[1])
    huge = _good(strategy, messages[2])
    flat = np.zeros(50 * sum(math.prod(s) for s in SHAPES.values()), dtype=np.float32)
    huge.content["arrays"] = ArrayRecord({"values": Array(flat)})
    reads = []
    monkeypatch.setattr(Array, "numpy", lambda self: reads.append(self) or pytest.fail("the payload was read"))
    arrays, _, ledger = play_round(strategy, [huge], 1)
    assert arrays is None
    assert ledger.rejected == ["client-2: 'values' is not a valid payload of 59 float32 values"]
    assert reads == []
    monkeypatch.undo()
    assert play_round(strategy, [honest])[0] is not None  # an honest reply still decodes


def test_replies_as_flower_delivers_them_pass_the_checks():
    """Deflated and inflated like a SuperLink's copy: the metadata checked before reading is the sender's."""
    strategy = _strategy(min_clients=2)
    messages = _messages(strategy, [1, 2])
    delivered = []
    for message in messages.values():
        content = _good(strategy, message).content
        wire_copy = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(content).items()}
        delivered.append(Message(inflate_object_from_contents(content.object_id, wire_copy), reply_to=message))
    arrays, _, ledger = play_round(strategy, delivered, 1)
    assert arrays is not None and not ledger.rejected


def test_client_error_text_and_privacy_refusal_text_never_reach_the_ledger():
    strategy = _strategy(privacy="sample", min_clients=1)
    messages = _messages(strategy, [1, 2, 3, 4])
    refusal = _good(strategy, messages[2])
    refusal.content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 10, "epsilon": 2.5}),
            "info": ConfigRecord({"name": "client-2", "privacy-spent": f"budget spent on {SECRETS[0]}"}),
        }
    )
    replies = [_good(strategy, messages[1]), refusal, _error(messages[3], code=0), _error(messages[4], code=-7)]
    _, _, ledger = play_round(strategy, replies, 1, budget_replies=True)
    assert ledger.rejected == [
        "client-2: privacy budget spent",
        f"node 3: {client_error(0)}",
        "node 4: client error (unknown code)",
    ]
    assert ledger.budget_spent == {"client-2": 2.5}
    _assert_no_secrets(ledger.rejected)


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("name", SECRETS[0], "node 2: 'name' must be 1 to 64 letters, digits, '_', '.' or '-'"),
        ("name", "x" * 65, "node 2: 'name' must be 1 to 64 letters, digits, '_', '.' or '-'"),
        ("process", "host/4111-1111", "client-2: 'process' must be 1 to 64 letters, digits, '_', '.', ':' or '-'"),
        ("model-loads", -1, "client-2: 'model-loads' must be an integer between 0 and 1000000"),
        ("frozen-checksum", "A" * 64, "client-2: 'frozen-checksum' must be 64 lowercase hex digits or empty"),
        ("mode", "auto", "client-2: 'mode' must be backprop or zo"),
    ],
)
def test_malformed_info_fields_reject_the_reply(key, value, reason):
    strategy = _strategy(min_clients=1)
    messages = _messages(strategy, [1, 2])
    forged = _set_info(_good(strategy, messages[2]), key, value)
    arrays, _, ledger = play_round(strategy, [_good(strategy, messages[1]), forged], 1)
    assert arrays is not None and ledger.rejected == [reason]
    _assert_no_secrets(ledger.rejected)


def test_a_non_finite_aggregate_keeps_the_previous_global_model(monkeypatch):
    strategy = FedIT(min_clients=1)
    messages = _messages(strategy, [1])
    monkeypatch.setattr(strategy, "combine", lambda current, updates: {n: v * math.inf for n, v in current.items()})
    arrays, metrics, ledger = play_round(strategy, [_good(strategy, messages[1])])
    assert (arrays, metrics) == (None, None)
    assert ledger.rejected == ["aggregate: non-finite result"]


def test_weighted_metrics_do_not_overflow_and_leave_out_what_is_not_finite():
    big = 1.7e308
    merged = weighted_metrics([(MAX_EXAMPLES, {"loss": big, "epsilon": math.inf}), (MAX_EXAMPLES, {"loss": big})])
    assert merged == {"loss": pytest.approx(big), "num-examples": 2 * MAX_EXAMPLES}
    json.dumps(merged, allow_nan=False)


def test_an_evaluate_reply_that_breaks_anything_is_skipped_not_raised():
    strategy = _strategy()
    messages = _evaluate_messages(strategy)
    no_metrics = Message(RecordDict({"info": ConfigRecord({"name": "d"})}), reply_to=messages[4])
    replies = [
        _evaluate_reply(messages[1], {"num-examples": 5, "loss": 1.0}, "a"),
        _error(messages[2], code=3),
        _evaluate_reply(messages[3], {"num-examples": 5, "loss": "1.0"}, "c"),
        no_metrics,
    ]
    result, ledger = play_evaluation(strategy, replies, 1)
    assert dict(result) == {"num-examples": 5, "loss": 1.0}
    assert ledger.eval_rejected == [
        f"node 2: {client_error(3)}",
        "c: '*loss' must be a finite number >= 0",
        "d: missing 'metrics' record",
    ]


# -- random malformed replies against every strategy and privacy mode --------------------

INVALID_COUNTS = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, 0, 0.5, -3, 10**12, 2**70, MAX_EXAMPLES + 1, 1e300]),
    st.floats(allow_nan=True).filter(lambda v: not (v.is_integer() and 1 <= v <= MAX_EXAMPLES)),
    st.integers().filter(lambda v: not 1 <= v <= MAX_EXAMPLES),
    st.lists(st.integers(1, 10), min_size=1, max_size=3),
    st.sampled_from(["10", None, b"10"]),
)
NEGATIVE = st.one_of(
    st.floats(max_value=-1e-9), st.just(math.nan), st.integers(max_value=-1), st.lists(st.floats(0, 1), min_size=1)
)
INVALID_METRICS = st.one_of(
    st.tuples(st.sampled_from(["train_loss", "val_loss", "steps", "train_s", "epsilon", "sample_rate"]), NEGATIVE),
    st.tuples(st.sampled_from(["train_loss", "train_s", "steps", "zo_grad_abs"]), st.just(math.inf)),
    st.tuples(st.sampled_from(["client_accuracy", "sample_rate"]), st.floats(min_value=1.0000001)),
    st.tuples(st.just("client_accuracy"), st.just(333333333.69)),
    st.tuples(st.just("steps"), st.sampled_from([0.5, 10**8, 2**70, "3"])),
)
INVALID_INFO = st.one_of(
    st.tuples(st.just("name"), st.sampled_from(["", "a b", "x" * 65, SECRETS[0], 5, b"c", "é/"])),
    st.tuples(st.just("name"), st.text(max_size=70).filter(lambda s: not re.fullmatch(r"[\w.-]{1,64}", s))),
    st.tuples(st.just("mode"), st.sampled_from(["", "ZO", "auto", 1])),
    st.tuples(st.just("model-loads"), st.sampled_from([-1, 10**6 + 1, 0.5, "3", math.inf, math.nan])),
    st.tuples(st.just("frozen-checksum"), st.sampled_from(["XYZ", "A" * 64, "0" * 63, 5, SECRETS[1]])),
    st.tuples(st.just("process"), st.sampled_from(["", "a/b", "x" * 65, " ", SECRETS[0]])),
    st.tuples(st.just("privacy-spent"), st.sampled_from([5, 1.5, b"x", "x" * 5000])),
)
RANDOM_VALUES = st.one_of(
    st.integers(), st.floats(), st.text(max_size=8), st.lists(st.integers(), max_size=4), st.lists(st.text(max_size=4))
)


def _corrupt_layout(data: st.DataObject, layout: ConfigRecord) -> None:
    raw = layout.__dict__["_data"]
    how = data.draw(st.sampled_from(["negate", "transpose", "rename", "drop", "add", "ndim", "codec", "junk", "type"]))
    if how == "negate":  # the product of the first shape stays, so do the sizes
        raw["shape"] = [-raw["shape"][0], -raw["shape"][1], *raw["shape"][2:]]
    elif how == "transpose":
        raw["shape"] = [raw["shape"][1], raw["shape"][0], *raw["shape"][2:]]
    elif how == "rename":
        raw["names"] = [data.draw(st.text(max_size=8)), *raw["names"][1:]]
    elif how == "drop":
        raw["names"], raw["ndims"], raw["shape"] = raw["names"][1:], raw["ndims"][1:], raw["shape"][2:]
    elif how == "add":
        raw["names"], raw["ndims"] = [*raw["names"], "extra.weight"], [*raw["ndims"], 1]
        raw["shape"] = [*raw["shape"], 0]
    elif how == "ndim":
        raw["ndims"] = [data.draw(st.integers().filter(lambda n: n != 2)), *raw["ndims"][1:]]
    elif how == "codec":
        other = RANDOM_VALUES.filter(lambda v: v != "none")
        raw["codec"] = data.draw(st.one_of(st.sampled_from(["fp16", "int8"]), other))
    elif how == "junk":
        key = data.draw(st.sampled_from(["codec", "names", "ndims", "shape"]))
        raw[key] = data.draw(RANDOM_VALUES.filter(lambda v: v != raw[key]))
    else:
        del raw[data.draw(st.sampled_from(["codec", "names", "ndims", "shape"]))]


def _corrupt_arrays(data: st.DataObject, content: RecordDict) -> None:
    values = content["arrays"]["values"]
    count = values.shape[0]
    how = data.draw(st.sampled_from(["bigger", "smaller", "dtype", "extra", "key", "lie", "bytes", "nonfinite"]))
    if how in ("bigger", "smaller"):
        size = data.draw(st.integers(count + 1, 50 * count) if how == "bigger" else st.integers(0, count - 1))
        content["arrays"] = ArrayRecord({"values": Array(np.zeros(size, dtype=np.float32))})
    elif how == "dtype":
        dtype = data.draw(st.sampled_from([np.float64, np.float16, np.int8, np.int32, np.uint8]))
        content["arrays"] = ArrayRecord({"values": Array(np.zeros(count, dtype=dtype))})
    elif how == "extra":
        content["arrays"]["scales"] = Array(np.zeros(1, dtype=np.float32))
    elif how == "key":
        content["arrays"] = ArrayRecord({data.draw(st.text(max_size=6).filter(lambda k: k != "values")): values})
    elif how == "lie":  # metadata as the plan wants, bytes of something else
        shape = tuple(data.draw(st.lists(st.integers(-3, 3 * count), min_size=0, max_size=3)))
        raw = data.draw(st.binary(max_size=64))
        content["arrays"] = ArrayRecord({"values": Array("float32", shape, "numpy.ndarray", raw)})
    elif how == "bytes":
        raw = data.draw(st.binary(min_size=4 * count, max_size=4 * count + 200))
        content["arrays"] = ArrayRecord({"values": Array("float32", (count,), "numpy.ndarray", raw)})
    else:
        flat = values.numpy().copy()
        flat[data.draw(st.integers(0, count - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        content["arrays"] = ArrayRecord({"values": Array(flat)})


def _outside(high: int) -> st.SearchStrategy:
    """Not an integer in [1, high]."""
    return st.one_of(st.integers(max_value=0), st.integers(min_value=high + 1), st.floats())


def _zo_content(data: st.DataObject, content: RecordDict, valid: bool) -> None:
    """Seeds instead of tensors: a small valid round, or one with a bad count, size or value."""
    steps = [
        ZOStep(0.01, [data.draw(st.integers(0, 2**62))], [data.draw(st.floats(-1, 1))])
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    records = wire.encode_seeds(steps, 0.0)
    if not valid:
        how = data.draw(st.sampled_from(["steps", "samples", "decay", "size", "lr"]))
        config = records["zo-config"].__dict__["_data"]
        if how == "steps":
            config["steps"] = data.draw(_outside(wire.MAX_ZO_STEPS))
        elif how == "samples":
            config["samples"] = data.draw(_outside(wire.MAX_ZO_SAMPLES))
        elif how == "decay":
            config["weight-decay"] = data.draw(st.sampled_from([math.nan, math.inf, -0.1, "0", 1]))
        elif how == "size":
            packed = records["zo"]["packed"].numpy()
            extra = data.draw(st.integers(1, 40))
            records["zo"] = ArrayRecord({"packed": Array(np.concatenate([packed, np.zeros(extra, dtype=np.uint8)]))})
        else:
            records = wire.encode_seeds([ZOStep(-0.01, s.seeds, s.grads) for s in steps], 0.0)
    del content["arrays"], content["layout"]
    content["zo"], content["zo-config"] = records["zo"], records["zo-config"]


def _bad_probe(data: st.DataObject, content: RecordDict) -> None:
    """A head probe that is not this head's: every tensor sent, a byte short, int8, an extra array, or beside tensors."""
    fault = data.draw(st.sampled_from(["all", "short", "dtype", "extra", "both"]))
    tensors = wire.decode(content["arrays"], content["layout"])
    head = {name: value for name, value in tensors.items() if role_of(name) == "head"} or tensors
    record = wire.encode_head_probe(tensors if fault == "all" else head)[wire.HEAD_PROBE]
    if fault == "short":
        record["packed"] = Array(record["packed"].numpy()[:-1])
    elif fault == "dtype":
        record["packed"] = Array(record["packed"].numpy().view(np.int8))
    elif fault == "extra":
        record["more"] = Array(np.zeros(1, np.uint8))
    if fault != "both":
        del content["arrays"], content["layout"]
    content[wire.HEAD_PROBE] = record


KINDS = ["good", "huge", "zo", "count", "metric", "info", "layout", "arrays", "zo-bad", "probe-bad", "missing", "error", "junk"]
GOOD_KINDS = {"good", "huge", "zo"}


def _train_reply(data: st.DataObject, strategy: LoraStrategy, message: Message, kind: str) -> Message:
    """A reply of ``kind``: good, or malformed in one drawn way that must get it rejected."""
    count = data.draw(st.one_of(st.integers(1, 1000), st.just(MAX_EXAMPLES), st.just(float(MAX_EXAMPLES))))
    answer = _good(strategy, message, count, scale=3e38 if kind == "huge" else data.draw(st.floats(-1, 1)))
    content = answer.content
    if kind == "zo":
        _zo_content(data, content, valid=True)
    elif kind == "count":
        if data.draw(st.booleans()):
            _set_metric(answer, "num-examples", data.draw(INVALID_COUNTS))
        else:
            del content["metrics"]["num-examples"]
    elif kind == "metric":
        _set_metric(answer, *data.draw(INVALID_METRICS))
    elif kind == "info":
        _set_info(answer, *data.draw(INVALID_INFO))
    elif kind == "probe-bad":
        _bad_probe(data, content)
    elif kind == "layout":
        _corrupt_layout(data, content["layout"])
    elif kind == "arrays":
        _corrupt_arrays(data, content)
    elif kind == "zo-bad":
        _zo_content(data, content, valid=False)
    elif kind == "missing":
        del content[data.draw(st.sampled_from(["metrics", "arrays", "layout"]))]
    elif kind == "error":
        return _error(message, data.draw(st.integers(-(2**40), 2**40)))
    elif kind == "junk":
        keys = st.sampled_from(["arrays", "layout", "metrics", "zo", "num-examples"])
        junk = data.draw(st.dictionaries(keys, RANDOM_VALUES, max_size=4))
        answer.content = RecordDict({"metrics": MetricRecord({}), "layout": ConfigRecord({})})
        answer.content["layout"].__dict__["_data"].update(junk)
        answer.content["metrics"].__dict__["_data"].update(junk)
    return answer


def _assert_finite_round(strategy: LoraStrategy, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
    if arrays is None:
        assert metrics is None
        return
    tensors = arrays.to_torch_state_dict()
    adapter = {name for name in tensors if role_of(name) != RESIDUAL}  # FLoRA, FedEx-LoRA add base residuals
    assert adapter == set(SHAPES) and all(torch.isfinite(v).all() for v in tensors.values())
    json.dumps(dict(metrics), allow_nan=False)


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_malformed_train_replies_are_rejected_and_never_break_a_round(data):
    name = data.draw(st.sampled_from(sorted(STRATEGIES)))
    privacy = data.draw(st.sampled_from(sorted(PRIVACY)))
    strategy = _strategy(name, privacy, min_clients=2)
    messages = _messages(strategy)
    kinds = {node: data.draw(st.sampled_from(KINDS)) for node in messages}
    replies = [_train_reply(data, strategy, messages[node], kind) for node, kind in kinds.items()]
    arrays, metrics, ledger = play_round(strategy, replies, 1, budget_replies=privacy == "sample")

    accepted = GOOD_KINDS - ({"zo"} if strategy.plan.per_client_ranks else set())  # seeds: one broadcast only
    good = {f"client-{node}" for node, kind in kinds.items() if kind in accepted}
    assert {u.name for u in ledger.updates} == good
    for node, kind in kinds.items():
        if kind not in accepted:
            who = (f"client-{node}: ", f"node {node}: ")
            assert any(reason.startswith(who) for reason in ledger.rejected), (kind, ledger.rejected)
    _assert_no_secrets(ledger.rejected)
    _assert_finite_round(strategy, arrays, metrics)
    if len(good) < getattr(strategy, "strategy", strategy).min_clients:
        assert arrays is None
    elif arrays is None:
        assert "aggregate: non-finite result" in ledger.rejected
        assert "huge" in kinds.values()


EVAL_KINDS = ["good", "empty", "count", "metric", "name", "error", "missing"]


def _eval_reply(data: st.DataObject, message: Message, kind: str) -> tuple[Message, int]:
    """An evaluate reply of ``kind`` and the examples it should add to the total."""
    node = message.metadata.dst_node_id
    count = data.draw(st.integers(1, MAX_EXAMPLES))
    metrics = {"num-examples": count, "accuracy": data.draw(st.floats(0, 1)), "loss": data.draw(st.floats(0, 1e300))}
    unknown = st.text(max_size=6).filter(lambda k: not k.endswith(("accuracy", "loss")) and k != "num-examples")
    metrics[data.draw(unknown)] = data.draw(RANDOM_VALUES)  # dropped, whatever it holds
    name = f"client-{node}"
    if kind == "empty":
        metrics.update({"num-examples": 0, "accuracy": 0.0, "loss": 0.0})
    elif kind == "count":
        metrics["num-examples"] = data.draw(INVALID_COUNTS.filter(lambda v: v != 0))  # 0: nothing held out
    elif kind == "metric":
        key = data.draw(st.sampled_from(["accuracy", "loss", "val_loss", "top1_accuracy"]))
        bad = st.floats(min_value=1.0000001) if key.endswith("accuracy") else st.just(math.inf)
        metrics[key] = data.draw(st.one_of(NEGATIVE, bad, st.sampled_from(["0.5", None])))
    elif kind == "name":
        name = data.draw(INVALID_INFO.filter(lambda pair: pair[0] == "name"))[1]
    elif kind == "error":
        return _error(message, data.draw(st.integers())), 0
    elif kind == "missing":
        return Message(RecordDict({"info": ConfigRecord({"name": name})}), reply_to=message), 0
    answer = _evaluate_reply(message, metrics, "x")
    answer.content["info"].__dict__["_data"]["name"] = name
    return answer, count if kind == "good" else 0


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_malformed_evaluate_replies_are_skipped_and_the_metrics_stay_finite(data):
    strategy = _strategy(data.draw(st.sampled_from(sorted(STRATEGIES))), data.draw(st.sampled_from(sorted(PRIVACY))))
    messages = _evaluate_messages(strategy)
    kinds = {node: data.draw(st.sampled_from(EVAL_KINDS)) for node in messages}
    replies, counted = zip(*(_eval_reply(data, messages[node], kind) for node, kind in kinds.items()))
    result, ledger = play_evaluation(strategy, list(replies), 1)

    bad = [kind for kind in kinds.values() if kind not in ("good", "empty")]
    assert len(ledger.eval_rejected) == len(bad)
    _assert_no_secrets(ledger.eval_rejected)
    if "good" not in kinds.values():
        assert result is None
        return
    merged = dict(result)
    counts, _ = cap_weights([n for n in counted if n > 0], getattr(strategy, "strategy", strategy).robust.max_weight_ratio)  # issue 31, finding 11
    assert merged["num-examples"] == pytest.approx(sum(counts)) and set(merged) == {"num-examples", "accuracy", "loss"}
    assert 0 <= merged["accuracy"] <= 1
    json.dumps(merged, allow_nan=False)
