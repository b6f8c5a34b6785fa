"""FedIT math and the reply checks every strategy shares."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedtune.core.wire import payload_bytes
from fedtune.strategies.fedit import FedIT, weighted_mean
from fedtune.strategies.robust import RobustSettings
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

NAMES = ["m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"]
SHAPES = [(4, 16), (16, 4), (3, 16)]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) for n, s in zip(NAMES, SHAPES)}


def test_weighted_mean_is_example_weighted():
    a, b = _tensors(0), _tensors(1)
    mean = weighted_mean([a, b], [1, 3])
    for name in NAMES:
        assert torch.allclose(mean[name], 0.25 * a[name] + 0.75 * b[name])


def test_fedit_round_aggregates_good_replies_and_rejects_malformed_ones():
    enter_run()
    strategy = FedIT(fraction=1.0, min_clients=2)
    strategy.robust = RobustSettings("none")  # the plain example-weighted mean (two replies bound each other)
    messages = list(
        strategy.configure_train(1, ArrayRecord(_tensors(0)), ConfigRecord(), StaticGrid([11, 12, 13, 14, 15]))
    )
    assert len(messages) == 5
    assert all(set(tensors_of(m)) == set(NAMES) for m in messages)

    good1, good2 = _tensors(1), _tensors(2)
    nan = _tensors(3)
    nan[NAMES[0]][0, 0] = math.nan
    wrong_shape = {**_tensors(4), NAMES[1]: torch.zeros(16, 5)}
    missing = {k: v for k, v in _tensors(5).items() if k != NAMES[2]}
    replies = [
        reply(messages[0], good1, 10, "a"),
        reply(messages[1], good2, 30, "b"),
        reply(messages[2], nan, 10, "nan"),
        reply(messages[3], wrong_shape, 10, "shape"),
        reply(messages[4], missing, 10, "keys"),
    ]
    arrays, metrics, ledger = play_round(strategy, replies, 1)

    expected = weighted_mean([good1, good2], [10, 30])
    result = arrays.to_torch_state_dict()
    assert all(torch.allclose(result[n], expected[n]) for n in NAMES)
    assert metrics["num-examples"] == 40 and metrics["train_loss"] == pytest.approx(0.5)
    reasons = " ".join(ledger.rejected)
    assert "nan: " in reasons and "NaN" in reasons
    assert "shape: " in reasons and "expected (16, 4)" in reasons
    assert "keys: " in reasons and "missing" in reasons
    assert ledger.bytes_up == sum(payload_bytes(r.content) for r in replies)


def test_too_few_good_replies_leave_the_global_adapter_unchanged():
    enter_run()
    strategy = FedIT(fraction=1.0, min_clients=2)
    strategy.robust = RobustSettings("none")  # the plain example-weighted mean (two replies bound each other)
    messages = list(strategy.configure_train(1, ArrayRecord(_tensors(0)), ConfigRecord(), StaticGrid([1, 2])))
    bad = {**_tensors(1), NAMES[0]: torch.full(SHAPES[0], math.inf)}
    arrays, _, ledger = play_round(strategy, [reply(messages[0], _tensors(1)), reply(messages[1], bad)], 1)
    assert arrays is None


def test_sampling_is_seeded_and_respects_fraction_and_minimum():
    enter_run()
    grid = StaticGrid(list(range(100, 120)))
    picks = []
    for _ in range(2):
        strategy = FedIT(fraction=0.25, min_clients=2, sample_seed=7)
        picks.append(
            [
                m.metadata.dst_node_id
                for m in strategy.configure_train(1, ArrayRecord(_tensors(0)), ConfigRecord(), grid)
            ]
        )
    assert picks[0] == picks[1] and len(picks[0]) == 5 and len(set(picks[0])) == 5
    small = FedIT(fraction=0.01, min_clients=3)
    assert len(list(small.configure_train(1, ArrayRecord(_tensors(0)), ConfigRecord(), grid))) == 3
