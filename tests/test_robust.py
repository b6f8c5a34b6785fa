"""Robust aggregation (``strategy.robust``): bounded weights and update norms, trimmed mean, median.

The unit tests drive the real strategies with hand-made replies (no model); the slow test runs
the quickstart with hostile clients from ``benchmarks/hostile_app`` (a liar claiming 10⁶× its
examples with every tensor 0.5, and a client sending 10⁶× its update).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from conftest import REPO, run_cli
from fedtune.cli.resolve import resolve
from fedtune.core.config import Config, load_config
from fedtune.core.errors import UserError
from fedtune.strategies import build_strategy
from fedtune.strategies.fair import fair_aggregate
from fedtune.strategies.robust import (
    RobustSettings,
    cap_weights,
    clip_updates,
    coordinate_median,
    others_bounds,
    trimmed_mean,
    update_norms,
    weighted_mean,
)
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

QUICKSTART = "simulations/configs/quickstart.yaml"
LAYERS = 3


def _start(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    start = {"classifier.weight": torch.randn(3, 8, generator=generator)}
    for i in range(LAYERS):
        start[f"layer{i}.q.lora_A.weight"] = torch.randn(4, 8, generator=generator)
        start[f"layer{i}.q.lora_B.weight"] = torch.randn(8, 4, generator=generator) * 0.1
    return start


def _strategy(strategy: str = "fedit", clients: int = 10, **settings):
    raw = {
        "strategy": {"name": strategy, **settings},
        "federation": {"clients": clients, "min_clients": 2},
    }
    return build_strategy(Config.model_validate(raw))


def _round(strategy, clients: list[tuple[dict, int]], start=None):
    """One round: ``clients`` are (tensors to send, num-examples) or a function of the broadcast
    giving them. Returns (broadcast, what each client sent, the new global tensors, the round's ledger)."""
    enter_run()
    start = _start() if start is None else start
    nodes = list(range(1, len(clients) + 1))
    messages = list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid(nodes)))
    messages.sort(key=lambda m: m.metadata.dst_node_id)
    broadcast = tensors_of(messages[0])
    replies, sent = [], []
    for k, (message, client) in enumerate(zip(messages, clients)):
        tensors, count = client(broadcast) if callable(client) else client
        sent.append(tensors)
        proof = {"frozen-checksum": strategy.frozen_checksum or ""}
        replies.append(reply(message, tensors, num_examples=count, name=f"client-{k:02d}", **proof))
    new, _, ledger = play_round(strategy, replies, 1)
    assert not ledger.rejected, ledger.rejected
    result = new.to_torch_state_dict()
    return broadcast, sent, {k: result[k] for k in broadcast}, ledger


def _honest(seed: int, scale: float = 0.05):
    """A client that moves every sent tensor by a random step (norm ≈ scale·√coordinates)."""

    def client(broadcast):
        generator = torch.Generator().manual_seed(100 + seed)
        tensors = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in broadcast.items()}
        return tensors, 80 + 5 * seed

    return client


def _liar(broadcast):
    return {k: torch.full_like(v, 0.5) for k, v in broadcast.items()}, 10**9


def _distance(x: dict, y: dict) -> float:
    return math.sqrt(sum(float((x[k].double() - y[k].double()).square().sum()) for k in x))


# -- finding 3: one liar ----------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["fedit", "ffa", "fedsa", "fair"])
def test_a_liar_cannot_take_over_the_global_model_under_the_defaults(strategy_name):
    clients = [_honest(k) for k in range(9)] + [_liar]
    strategy = _strategy(strategy_name)
    broadcast, sent, new, ledger = _round(strategy, clients)
    counts = [80 + 5 * k for k in range(9)]
    honest = fair_aggregate(sent[:9], counts) if strategy_name == "fair" else weighted_mean(sent[:9], counts)
    poison = sent[9]
    median_norm = sorted(update_norms(sent[:9], [broadcast] * 9))[4]
    assert ledger.stats.get("robust_clipped", 0) == 1 and ledger.stats.get("robust_capped", 0) == 1
    # the liar holds at most 3/(3+9) of the weight and moves at most 3 median norms
    assert _distance(new, honest) <= 1.0 * median_norm
    assert _distance(new, honest) < 0.1 * _distance(poison, honest)  # without bounds: the whole distance


def test_without_robust_aggregation_the_liar_takes_over():
    clients = [_honest(k) for k in range(9)] + [_liar]
    strategy = _strategy("fedit", robust="none")
    _, sent, new, ledger = _round(strategy, clients)
    poison = sent[9]
    for name in poison:
        assert torch.allclose(new[name], poison[name], atol=1e-5)  # what finding 3 reproduced
    assert ledger.stats.get("robust_clipped", 0) == 0 and ledger.stats.get("robust_capped", 0) == 0


@pytest.mark.parametrize("method", ["trimmed-mean", "median"])
def test_coordinatewise_statistics_ignore_the_liar(method):
    clients = [_honest(k) for k in range(9)] + [_liar]
    broadcast, sent, new, ledger = _round(_strategy("ffa", robust=method), clients)
    honest = weighted_mean(sent[:9], [80 + 5 * k for k in range(9)])
    median_norm = sorted(update_norms(sent[:9], [broadcast] * 9))[4]
    assert _distance(new, honest) <= 0.5 * median_norm


# -- finding 4: one huge update ---------------------------------------------------------


def test_a_huge_update_is_clipped_to_norm_bound_times_the_median_of_the_others():
    generator = torch.Generator().manual_seed(1)
    reference = {"a": torch.randn(5, 4, generator=generator), "b": torch.randn(7, generator=generator)}
    updates = []
    for k in range(5):
        step = (k + 1) * 0.01
        updates.append({n: v + step * torch.randn(v.shape, generator=generator) for n, v in reference.items()})
    huge = {n: reference[n] + (v - reference[n]) * 1e6 for n, v in updates[0].items()}
    tensors = [huge, *updates[1:]]
    norms = update_norms(tensors, [reference] * 5)
    median = statistics.median(norms[1:])  # the others' median: no update sets its own bound
    clipped, count = clip_updates(tensors, [reference] * 5, 3.0)
    assert count == 1
    assert update_norms(clipped[:1], [reference])[0] == pytest.approx(3.0 * median, rel=1e-5)
    direction = torch.cat([(huge[n] - reference[n]).flatten() for n in reference])
    kept = torch.cat([(clipped[0][n] - reference[n]).flatten() for n in reference])
    assert float(torch.nn.functional.cosine_similarity(direction, kept, dim=0)) > 1 - 1e-5
    for before, after in zip(tensors[1:], clipped[1:]):  # the others are untouched
        assert all(torch.equal(before[n], after[n]) for n in reference)


def test_ffa_global_norm_stays_put_after_a_huge_update():
    def huge(broadcast):
        tensors, count = _honest(0)(broadcast)
        return {k: broadcast[k] + (v - broadcast[k]) * 1e6 for k, v in tensors.items()}, count

    clients = [huge] + [_honest(k) for k in range(1, 10)]
    strategy = _strategy("ffa")
    broadcast, sent, new, ledger = _round(strategy, clients)
    median_norm = sorted(update_norms(sent, [broadcast] * 10))[5]
    assert ledger.stats.get("robust_clipped", 0) == 1
    assert _distance(new, broadcast) <= 3.0 * median_norm  # the whole round moves less than one bound
    _, _, unbounded, ledger = _round(_strategy("ffa", robust="none"), clients)
    assert _distance(unbounded, broadcast) > 1e4 * median_norm  # what finding 4 reproduced


# -- the statistics themselves ----------------------------------------------------------


def test_trimmed_mean_and_median_on_hand_made_values():
    values = [[1.0, -4.0], [2.0, 10.0], [3.0, 0.0], [100.0, 1.0], [-50.0, 2.0]]
    tensors = [{"t": torch.tensor(v)} for v in values]
    assert torch.equal(coordinate_median(tensors)["t"], torch.tensor([2.0, 1.0]))
    # K = 5, trim 0.2: one value off each end per coordinate
    assert torch.allclose(trimmed_mean(tensors, 0.2)["t"], torch.tensor([2.0, 1.0]))
    # trim 0.39 still drops one (⌊0.39·5⌋ = 1); trim 0 is the plain mean
    assert torch.allclose(trimmed_mean(tensors, 0.39)["t"], torch.tensor([2.0, 1.0]))
    assert torch.allclose(trimmed_mean(tensors, 0.0)["t"], torch.tensor([11.2, 1.8]))
    even = [{"t": torch.tensor([[v, -v]])} for v in (1.0, 2.0, 3.0, 10.0)]
    assert torch.equal(coordinate_median(even)["t"], torch.tensor([[2.5, -2.5]]))
    assert torch.equal(trimmed_mean(even, 0.25)["t"], torch.tensor([[2.5, -2.5]]))


def test_ffa_median_is_taken_per_coordinate_of_b():
    clients = [_honest(k) for k in range(5)]
    strategy = _strategy("ffa", clients=5, robust="median")
    _, sent, new, ledger = _round(strategy, clients)
    assert ledger.stats.get("robust_clipped", 0) == 0  # similar steps: the median alone is at work
    assert all(".lora_A." not in name for name in new)  # A is frozen: never sent, never aggregated
    for name in new:
        expected = torch.stack([s[name] for s in sent]).median(dim=0).values  # odd K: a client's value
        assert torch.equal(new[name], expected), name


def test_fair_takes_the_robust_means_and_corrects_from_there():
    generator = torch.Generator().manual_seed(3)
    updates = []
    for _ in range(5):
        tensors = {"head.weight": torch.randn(2, 4, generator=generator)}
        for m in range(2):
            tensors[f"l{m}.q.lora_A.weight"] = torch.randn(4, 16, generator=generator)
            tensors[f"l{m}.q.lora_B.weight"] = torch.randn(12, 4, generator=generator) * 0.1
        updates.append(tensors)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    plain = fair_aggregate(updates, weights)
    # one code path: passing the weighted means in gives FAIR's usual result
    same = fair_aggregate(updates, weights, mean=weighted_mean(updates, weights))
    for name in plain:
        assert torch.allclose(plain[name], same[name], atol=1e-5), name
    median = coordinate_median(updates)
    robust = fair_aggregate(updates, weights, mean=median)
    for m in range(2):
        assert torch.equal(robust[f"l{m}.q.lora_A.weight"], median[f"l{m}.q.lora_A.weight"])  # Ā = the median
        assert not torch.allclose(robust[f"l{m}.q.lora_B.weight"], median[f"l{m}.q.lora_B.weight"])  # corrected
    assert torch.equal(robust["head.weight"], median["head.weight"])


# -- none and norm-bound reproduce the weighted mean when nothing is out of bounds ---------


def _old_weighted_mean(tensors, weights):
    """FedIT/FFA/FedSA's combine before robust aggregation, verbatim."""
    total = float(sum(weights))
    return {name: sum((w / total) * t[name] for t, w in zip(tensors, weights)) for name in tensors[0]}


@pytest.mark.parametrize("method", ["none", "norm-bound"])
@pytest.mark.parametrize("strategy_name", ["fedit", "ffa", "fedsa"])
def test_the_weighted_mean_is_unchanged_when_no_client_is_out_of_bounds(strategy_name, method):
    clients = [_honest(k) for k in range(6)]
    strategy = _strategy(strategy_name, clients=6, robust=method)
    _, sent, new, ledger = _round(strategy, clients)
    assert ledger.stats.get("robust_clipped", 0) == 0 and ledger.stats.get("robust_capped", 0) == 0
    expected = _old_weighted_mean(sent, [80 + 5 * k for k in range(6)])
    for name in new:
        assert torch.equal(new[name], expected[name]), name


def test_robust_none_keeps_the_old_mean_even_for_outliers():
    clients = [_honest(k) for k in range(9)] + [_liar]
    _, sent, new, ledger = _round(_strategy("fedit", robust="none"), clients)
    expected = _old_weighted_mean(sent, [80 + 5 * k for k in range(9)] + [10**9])
    assert all(torch.equal(new[name], expected[name]) for name in new)


def test_weights_are_capped_at_the_ratio_times_the_others_median_count():
    clients = [_honest(k) for k in range(4)] + [lambda b: (_honest(9)(b)[0], 10_000)]
    strategy = _strategy("fedit", clients=5, max_weight_ratio=2.0)
    _, sent, new, ledger = _round(strategy, clients)
    counts = [80, 85, 90, 95]  # the liar's cap: 2 × the median of the other four counts, 87.5
    expected = _old_weighted_mean(sent, [*counts, 2.0 * 87.5])
    assert ledger.stats.get("robust_capped", 0) == 1
    assert all(torch.allclose(new[name], expected[name], atol=1e-6) for name in new)


def test_with_two_replies_neither_counts_for_more_nor_moves_further_than_the_other():
    """Issue 31, finding 8: with the round's own median, one of two replies *was* the median."""
    honest, liar = {"a": torch.ones(4)}, {"a": torch.full((4,), 1e6)}
    start = {"a": torch.zeros(4)}
    weights, capped = cap_weights([10, 10**9], 3.0)
    clipped, count = clip_updates([honest, liar], [start, start], 3.0)
    assert (weights, capped) == ([10.0, 10.0], 1)
    assert count == 1 and torch.allclose(clipped[1]["a"], honest["a"])  # no longer than the honest update
    assert others_bounds([5.0], 3.0) == [math.inf]  # one reply: nothing to compare with


def test_settings_are_validated():
    with pytest.raises(ValueError):
        RobustSettings("mean")
    for key, value in [("robust", "mean"), ("trim_fraction", 0.5), ("norm_bound", 0.5), ("max_weight_ratio", 0.9)]:
        with pytest.raises(UserError, match=f"strategy.{key}"):
            load_config(QUICKSTART, [f"strategy.{key}={value}"])


# -- client-level DP ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["trimmed-mean", "median"])
def test_coordinatewise_statistics_are_refused_with_client_level_dp(method):
    overrides = ["privacy.mode=client", "privacy.noise_multiplier=1.0", f"strategy.robust={method}"]
    with pytest.raises(UserError, match=f"strategy.robust {method}: not with privacy.mode client") as info:
        resolve(load_config(QUICKSTART, overrides), name_hint="t", need_train_data=True)
    assert "\n" not in str(info.value)
    for allowed in ("norm-bound", "none"):  # and sample-level DP takes any (post-processing)
        config = load_config(QUICKSTART, [*overrides[:2], f"strategy.robust={allowed}"])
        resolve(config, name_hint="t", need_train_data=True)
    resolve(
        load_config(QUICKSTART, ["privacy.mode=sample", "privacy.noise_multiplier=1.0", f"strategy.robust={method}"]),
        name_hint="t",
        need_train_data=True,
    )


def test_norm_bound_is_a_no_op_under_client_level_dp():
    def dp_strategy(method):
        raw = {
            "strategy": {"name": "fedit", "robust": method},
            "federation": {"clients": 10, "min_clients": 2, "fraction": 1.0},
            "privacy": {"mode": "client", "noise_multiplier": 0.5, "clip_norm": 0.5, "seed": 0},
        }
        return build_strategy(Config.model_validate(raw))

    clients = [_honest(k) for k in range(9)] + [_liar]
    bounded = dp_strategy("norm-bound")
    _, _, with_bounds, bounded_ledger = _round(bounded, clients)
    _, _, without, _ = _round(dp_strategy("none"), clients)
    assert bounded_ledger.stats.get("robust_clipped", 0) == 0 and bounded_ledger.stats.get("robust_capped", 0) == 0
    assert all(torch.equal(with_bounds[name], without[name]) for name in without)


# -- end to end: hostile clients in a simulation -----------------------------------------


def _final(run) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from fedtune.engine.checkpoint import load_checkpoint

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tensors, _ = load_checkpoint(run / "checkpoints" / f"round-{records[-1]['round']}")
    return records, tensors


@pytest.mark.slow
def test_hostile_clients_in_a_simulation_leave_the_model_close_to_a_clean_run(tmp_path, monkeypatch):
    small = [
        "strategy.name=ffa",
        "federation.rounds=3",
        "client.local_steps=3",
        "data.eval_max_examples=120",
        "output.plots=false",
    ]
    app = str(REPO / "benchmarks" / "hostile_app")
    runs = {}
    for name, attacks in [("clean", {}), ("hostile", {"0": "liar", "1": "huge"})]:
        monkeypatch.setenv("FEDTUNE_ATTACKS", json.dumps(attacks))
        args = ["simulate", QUICKSTART, "--app", app, "--out", str(tmp_path / name)]
        result = run_cli(*args, *[a for s in small for a in ("--set", s)], timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = _final(tmp_path / name)
    (clean_records, _), (hostile_records, hostile) = runs["clean"], runs["hostile"]
    assert all(torch.isfinite(v).all() for v in hostile.values())
    norm = {name: math.sqrt(sum(float(v.double().square().sum()) for v in t.values())) for name, (_, t) in runs.items()}
    assert norm["hostile"] <= 2.0 * norm["clean"], norm
    for record in hostile_records:  # the liar capped and clipped, the huge update clipped, every round
        assert record["robust_capped"] >= 1 and record["robust_clipped"] >= 2, record
    assert "robust_clipped" not in clean_records[-1] or clean_records[-1]["robust_clipped"] <= 1
    accuracy = {"clean": clean_records[-1]["eval_accuracy"], "hostile": hostile_records[-1]["eval_accuracy"]}
    assert abs(accuracy["hostile"] - accuracy["clean"]) <= 0.1, accuracy
    assert hostile_records[-1]["eval_loss"] <= clean_records[-1]["eval_loss"] + 0.02
