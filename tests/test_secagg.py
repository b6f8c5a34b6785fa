"""Secure aggregation, at the protocol: the coordinator's four exchanges against clients in this process.

``LoopbackGrid`` delivers each message to a client function and its reply back, as Flower's Grid
does, so the coordinator's real ``SecureRound`` and the clients' real stage handlers
(client/secagg.py) run end to end without training: each client releases a fixed random change.
Hostile clients rewrite their stage replies; the round must then sum the honest clients exactly,
or fail with its one line, and never raise.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedtune.client import secagg as client_secagg
from fedtune.coordinator.identity import NodeNames
from fedtune.coordinator.secure_round import SETUP, SHARE_KEYS, UNMASK, SecureRound
from fedtune.coordinator.session import Session
from fedtune.core import secagg
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.flower_internals import SUPERLINK_NODE_ID
from fedtune.strategies import check_config
from fedtune.strategies.ffa import FfaLora
from fedtune.strategies.robust import RobustSettings
from flower_helpers import enter_run

CLIP = 0.05
SHAPES = {
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight": (24, 4),
    "base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.default.weight": (24, 4),
    "base_model.model.classifier.modules_to_save.default.weight": (3, 24),
    "base_model.model.classifier.modules_to_save.default.bias": (3,),
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": (4, 24),
}
Reply = Callable[[Message, int], Message | None]


class LoopbackGrid:
    """The part of Flower's Grid the coordinator uses, answering each message with CLIENTS[node]."""

    def __init__(self, clients: dict[int, Reply]) -> None:
        self.clients, self.replies, self.run = clients, {}, SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return sorted(self.clients)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__.update(_message_id=uuid.uuid4().hex, _src_node_id=SUPERLINK_NODE_ID)
            reply = self.clients[message.metadata.dst_node_id](message, message.metadata.dst_node_id)
            if reply is not None:  # None: the client is gone
                self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def release_of(node: int) -> np.ndarray:
    return np.random.default_rng(node).uniform(
        -CLIP / 2, CLIP / 2, size=sum(int(np.prod(s)) for n, s in SHAPES.items() if "lora_A" not in n)
    )


def count_of(node: int) -> int:
    return 10 * node + 5


def honest(message: Message, node: int) -> Message:
    """A client: the real stage handlers, and a train step that releases ``release_of(node)``."""
    kind = message.metadata.message_type
    config = message.content["config"]
    name = ConfigRecord({"name": f"client-{node}"})
    if kind == SETUP:
        record = client_secagg.setup(node, config)
        metrics = MetricRecord({"num-examples": count_of(node)})
        return Message(RecordDict({"secagg": record, "info": name, "metrics": metrics}), reply_to=message)
    if kind == SHARE_KEYS:
        return Message(RecordDict({"secagg": client_secagg.share_keys(node, config), "info": name}), reply_to=message)
    if kind == UNMASK:
        return Message(RecordDict({"secagg": client_secagg.unmask(node, config), "info": name}), reply_to=message)
    record = message.content["secagg"]
    bad = client_secagg.open_envelopes(node, record)
    vector, _ = client_secagg.masked_release(node, release_of(node), record["weight"], record)
    content = {
        "masked": ArrayRecord({"values": Array(vector)}),
        "secagg": ConfigRecord({"bad": bad}),
        "metrics": MetricRecord({"num-examples": count_of(node), "train_loss": 1.0}),
        "info": ConfigRecord({"name": f"client-{node}", "frozen-checksum": strategy_with_state().frozen_checksum}),
    }
    return Message(RecordDict(content), reply_to=message)


def strategy_with_state(robust: str = "none") -> FfaLora:
    strategy = FfaLora(min_clients=2, robust=RobustSettings(method=robust))
    state = {name: torch.randn(shape, generator=torch.Generator().manual_seed(1)) for name, shape in SHAPES.items()}
    strategy.prepare(1, ArrayRecord(state))
    return strategy


def config(threshold: int = 3, clients: int = 5) -> Config:
    return Config.model_validate({
        "strategy": {"name": "ffa"},
        "federation": {"clients": clients, "secure_aggregation": "secagg+", "secagg_threshold": threshold,
                       "secagg_clip": CLIP, "secagg_stage_timeout": 0.5, "round_timeout": 0.5},
    })  # fmt: skip


def run_round(clients: dict[int, Reply], robust: str = "none", threshold: int = 3):
    enter_run()
    grid = LoopbackGrid(clients)
    strategy = strategy_with_state(robust)
    session = Session(strategy, NodeNames(), budget_replies=False)
    messages = strategy.configure_train(1, ArrayRecord(strategy.current), ConfigRecord(), grid)
    secure = SecureRound(grid, session, strategy, config(threshold, len(clients)), 1)
    return secure.run(messages, deadline=time.time() + 2.0), strategy, session, secure


def expected_mean(strategy: FfaLora, nodes: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    flat = sum(w * release_of(n) for n, w in zip(nodes, weights)) / sum(weights)
    out, offset = {}, 0
    for name in sorted(strategy.uploaded_names()):
        size = strategy.current[name].numel()
        out[name] = strategy.broadcast[name].double() + torch.from_numpy(flat[offset : offset + size]).reshape(
            strategy.current[name].shape
        )
        offset += size
    return out


def assert_sum_of(outcome, strategy: FfaLora, nodes: list[int]) -> None:
    assert outcome.problem is None and outcome.arrays is not None
    new = outcome.arrays.to_torch_state_dict()
    counts = [count_of(n) for n in nodes]
    step = 2 * CLIP / secagg.TARGET_RANGE  # one quantization level of one client, relative to its weight
    for name, value in expected_mean(strategy, nodes, counts).items():
        assert torch.allclose(new[name].double(), value, atol=len(nodes) * step * max(counts) / min(counts) + 1e-6), (
            name
        )


def test_the_secure_sum_is_the_weighted_mean_to_the_quantization_step():
    outcome, strategy, _, _ = run_round(dict.fromkeys(range(2, 7), honest))
    assert_sum_of(outcome, strategy, list(range(2, 7)))
    assert outcome.stats["secagg_clients"] == 5 and outcome.stats["secagg_dropped"] == 0
    frozen = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert torch.equal(outcome.arrays.to_torch_state_dict()[frozen], strategy.current[frozen])  # FFA: A is never sent


def test_a_client_that_drops_after_sharing_keys_is_unmasked_by_the_others():
    def drops_at_train(message: Message, node: int) -> Message | None:
        return None if message.metadata.message_type not in (SETUP, SHARE_KEYS) else honest(message, node)

    clients = {**dict.fromkeys(range(2, 6), honest), 6: drops_at_train}
    outcome, strategy, session, _ = run_round(clients)
    assert_sum_of(outcome, strategy, [2, 3, 4, 5])  # the sum of those who uploaded: 6's pair masks are removed
    assert outcome.stats["secagg_dropped"] == 1


def test_below_the_threshold_the_attempt_stops_with_one_line():
    def gone_after_setup(message: Message, node: int) -> Message | None:
        return honest(message, node) if message.metadata.message_type == SETUP else None

    clients = {2: honest, 3: honest, 4: gone_after_setup, 5: gone_after_setup}
    outcome, *_ = run_round(clients, threshold=3)
    assert outcome.arrays is None
    assert outcome.problem == "secure aggregation: stopped at share-keys: 2 of 4 clients answered, threshold 3"


def test_what_the_coordinator_receives_is_uniform_in_the_ring():
    seen = {}

    def watched(message: Message, node: int) -> Message:
        reply = honest(message, node)
        if "masked" in reply.content.array_records:
            seen[node] = reply.content["masked"]["values"].numpy()
        return reply

    run_round(dict.fromkeys(range(2, 7), watched))
    masked = seen[3][: -secagg.EXTRA]
    assert chisquare(np.bincount(masked >> 24, minlength=256)).pvalue > 1e-4  # uniform in its top byte
    ints, _ = secagg.quantize(release_of(3), CLIP, np.random.default_rng(0))
    assert chisquare(np.bincount(ints.astype(np.uint32) >> 14, minlength=256)).pvalue < 1e-10  # the test sees structure


def test_norm_bound_caps_a_liar_s_count_in_the_clear():
    def liar(message: Message, node: int) -> Message:
        reply = honest(message, node)
        if message.metadata.message_type == SETUP:
            reply.content["metrics"] = MetricRecord({"num-examples": 10**9})
        return reply

    outcome, strategy, _, _ = run_round({**dict.fromkeys(range(2, 6), honest), 6: liar}, robust="norm-bound")
    assert outcome.problem is None and outcome.stats["robust_capped"] == 1
    others = sorted(count_of(n) for n in range(2, 6))
    cap = 3.0 * (others[1] + others[2]) / 2  # max_weight_ratio x the median of the other counts
    counts = [*[count_of(n) for n in range(2, 6)], cap]
    new = outcome.arrays.to_torch_state_dict()
    flat = sum(w * release_of(n) for n, w in zip(range(2, 7), counts)) / sum(counts)
    name = sorted(strategy.uploaded_names())[0]
    size = strategy.current[name].numel()
    want = strategy.broadcast[name].double() + torch.from_numpy(flat[:size]).reshape(strategy.current[name].shape)
    assert torch.allclose(new[name].double(), want, atol=1e-5)


STAGE_FIELDS = {
    SETUP: ["pk1", "pk2", "commit"],
    SHARE_KEYS: ["dsts", "envelopes", "b-digests", "sk-digests"],
    UNMASK: ["nids", "shares"],
}
JUNK = st.one_of(
    st.binary(max_size=700),
    st.integers(),
    st.lists(st.integers(), max_size=6),
    st.lists(st.binary(max_size=700), max_size=6),
    st.text(max_size=20),
    st.floats(allow_nan=True),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from([SETUP, SHARE_KEYS, "train", UNMASK]), field=st.integers(0, 3), junk=JUNK)
def test_a_hostile_client_s_malformed_stage_reply_costs_only_itself(stage, field, junk):
    """Any value in any field of one client's stage reply: the honest four are summed, or one line."""

    def hostile(message: Message, node: int) -> Message:
        reply = honest(message, node)
        if message.metadata.message_type == stage:
            record = reply.content["secagg"]
            keys = STAGE_FIELDS.get(stage, ["bad"])
            record[keys[field % len(keys)]] = junk
        return reply

    def wrong_vector(message: Message, node: int) -> Message:
        reply = hostile(message, node)
        if stage == "train" and "masked" in reply.content.array_records and field == 3:
            reply.content["masked"] = ArrayRecord({"values": Array(np.zeros(5, dtype=np.uint32))})
        return reply

    outcome, strategy, session, _ = run_round({**dict.fromkeys(range(2, 6), honest), 6: wrong_vector})
    if outcome.arrays is None:
        assert outcome.problem.startswith("secure aggregation: ") and "\n" not in outcome.problem
        return
    counted = sorted(u.node_id for u in session.ledger.updates)
    assert set(range(2, 6)) <= set(counted)
    assert_sum_of(outcome, strategy, counted)


def test_a_hostile_holder_s_wrong_share_is_caught_by_its_dealer_s_digest():
    def wrong_shares(message: Message, node: int) -> Message:
        reply = honest(message, node)
        if message.metadata.message_type == UNMASK:
            shares = list(reply.content["secagg"]["shares"])
            reply.content["secagg"]["shares"] = [s[:4] + bytes(len(s) - 4) for s in shares]  # right index, wrong value
        return reply

    outcome, strategy, session, _ = run_round({**dict.fromkeys(range(2, 6), honest), 6: wrong_shares})
    assert_sum_of(outcome, strategy, list(range(2, 7)))  # 6 uploaded honestly; its bad shares are not used
    assert any("client-6: secagg unmask: a share that is not the one dealt" == r for r in session.ledger.rejected)


def test_a_dealer_whose_shares_rebuild_nothing_sits_out_the_next_attempt():
    def bad_dealer(message: Message, node: int) -> Message:
        if message.metadata.message_type == SHARE_KEYS:  # deal shares of another seed, with matching digests
            client_secagg._ATTEMPTS[node].seed = bytes(32)  # noqa: SLF001 (the hostile client's own state)
            reply = honest(message, node)
            client_secagg._ATTEMPTS[node].seed = b"\x01" * 32  # noqa: SLF001 and masks with yet another
            return reply
        return honest(message, node)

    outcome, _, _, secure = run_round({**dict.fromkeys(range(2, 6), honest), 6: bad_dealer})
    assert outcome.arrays is None and "rebuild no secret" in outcome.problem
    assert secure.suspects == {6}


def test_a_client_refuses_stages_out_of_order_and_a_second_unmask():
    config_record = ConfigRecord({"secagg-nonce": "0" * 32, "threshold": 3, "clip": 0.1})
    client_secagg.setup(99, config_record)
    with pytest.raises(secagg.SecAggError, match="out of order"):
        client_secagg.unmask(99, ConfigRecord({"secagg-nonce": "0" * 32, "active": [99], "dead": []}))
    with pytest.raises(secagg.SecAggError, match="out of order"):  # the attempt ended with the refusal
        client_secagg.share_keys(99, config_record)


def test_a_rebuilt_key_must_match_its_published_public_key():
    private, public = secagg.new_keys()
    other, _ = secagg.new_keys()
    seeds, keys = secagg.deal(bytes(32), private, 3, 5)
    assert secagg.rebuilt_private_key(keys[:3], public) is not None
    assert secagg.rebuilt_private_key(keys[:2], public) is None  # t - 1 shares rebuild nothing
    _, wrong = secagg.deal(bytes(32), other, 3, 5)
    assert secagg.rebuilt_private_key(wrong[:3], public) is None


def test_the_masks_are_chacha20_streams_not_flower_s_32_bit_seeds():
    a, b = secagg.keystream(b"k" * 32, b"x", 1000), secagg.keystream(b"k" * 32, b"y", 1000)
    assert a.dtype == np.uint32 and not np.array_equal(a, b)
    assert np.array_equal(a, secagg.keystream(b"k" * 32, b"x", 1000))
    assert a.max() > 2**31  # the whole ring, not [0, R - 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"strategy": {"name": "flora"}},
            "strategy flora needs each client's tensors (it stacks each client's factors)",
        ),
        ({"strategy": {"name": "fair"}}, "strategy fair needs each client's tensors"),
        ({"strategy": {"name": "hetlora"}}, "strategy hetlora needs each client's tensors"),
        ({"strategy": {"name": "ffa", "robust": "median"}}, "strategy.robust median: a coordinate-wise statistic"),
        (
            {"strategy": {"name": "ffa"}, "privacy": {"mode": "client", "noise_multiplier": 1.0}},
            "privacy.mode client: not with",
        ),
        ({"strategy": {"name": "ffa"}, "client": {"mode": "zo", "zo_upload": "seeds"}}, "client.zo_upload seeds"),
        ({"strategy": {"name": "ffa"}, "client": {"mode": "zo", "zo_head": "probe"}}, "client.zo_head probe"),
        (
            {"strategy": {"name": "ffa"}, "federation": {"clients": 3, "secagg_threshold": 4}},
            "federation.secagg_threshold: 4 exceeds the 3",
        ),
    ],
)
def test_every_refused_combination_is_one_line_at_load(overrides, message):
    raw = {"federation": {"clients": 5, "secure_aggregation": "secagg+"}}
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(UserError) as refused:
        check_config(Config.model_validate(raw))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_linear_strategies_pass_the_check():
    for name in ("fedit", "ffa", "fedsa", "rolora"):
        check_config(
            Config.model_validate(
                {"strategy": {"name": name}, "federation": {"clients": 5, "secure_aggregation": "secagg+"}}
            )
        )
