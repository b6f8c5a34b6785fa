"""RoLoRA: clients train B in odd rounds and A in even rounds, so each round's mean is the mean of the products."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from conftest import run_cli
from fedtune.core.config import Config
from fedtune.core.plan import role_of
from fedtune.engine.checkpoint import load_checkpoint
from fedtune.strategies import build_strategy
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

NODES = [11, 12, 13]
LAYERS = ("q", "v")


def _start() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    start = {"m.classifier.weight": torch.randn(3, 8, generator=generator), "m.classifier.bias": torch.zeros(3)}
    for layer in LAYERS:
        start[f"m.{layer}.lora_A.weight"] = torch.randn(4, 8, generator=generator)
        start[f"m.{layer}.lora_B.weight"] = torch.randn(8, 4, generator=generator)
    return start


def _strategy(robust: str = "none"):
    config = Config.model_validate({
        "strategy": {"name": "rolora", "robust": robust}, "adapter": {"r": 4},
        "federation": {"clients": len(NODES), "min_clients": 2},
    })  # fmt: skip
    return build_strategy(config)


def _round(server_round: int, robust: str = "none"):
    """One round from ``_start``: (broadcast, the clients' trained tensors and counts, the new global tensors)."""
    enter_run()
    strategy, start = _strategy(robust), _start()
    messages = strategy.configure_train(server_round, ArrayRecord(start), ConfigRecord(), StaticGrid(NODES))
    sent = strategy.plan_for(server_round).sent
    uploads, counts, replies = [], [10, 30, 60], []
    for index, message in enumerate(messages):
        broadcast = tensors_of(message)
        tensors = {n: v + 0.3 * torch.randn_like(v) for n, v in broadcast.items() if role_of(n) in sent}
        uploads.append(tensors)
        replies.append(reply(message, tensors, num_examples=counts[index], name=f"client-{index}"))
    arrays, _, ledger = play_round(strategy, replies, server_round)
    assert arrays is not None and not ledger.rejected, ledger.rejected
    return broadcast, uploads, counts, arrays.to_torch_state_dict()


def test_odd_rounds_train_b_and_even_rounds_train_a_with_both_factors_sent_down():
    strategy = _strategy()
    assert strategy.plan_for(1).trained == strategy.plan_for(1).sent == {"lora_B", "head"}
    assert strategy.plan_for(2).trained == strategy.plan_for(2).sent == {"lora_A", "head"}
    assert strategy.plan_for(3) == strategy.plan_for(1) and strategy.plan_for(4) == strategy.plan_for(2)
    assert strategy.broadcast_roles(1) == strategy.broadcast_roles(2) == {"lora_A", "lora_B", "head"}


@pytest.mark.parametrize("server_round", [1, 2])
def test_the_aggregated_product_is_the_weighted_mean_of_the_clients_products(server_round):
    """FedIT's mean(B_k)·mean(A_k) is not mean(B_k·A_k); with the other factor common, RoLoRA's is, exactly."""
    broadcast, uploads, counts, new = _round(server_round)
    weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for layer in LAYERS:
        a, b = f"m.{layer}.lora_A.weight", f"m.{layer}.lora_B.weight"
        products = [u.get(b, broadcast[b]).double() @ u.get(a, broadcast[a]).double() for u in uploads]
        expected = sum(w * p for w, p in zip(weights, products))
        torch.testing.assert_close(new[b].double() @ new[a].double(), expected, rtol=1e-5, atol=1e-5)
        untrained = a if server_round % 2 else b
        torch.testing.assert_close(new[untrained], broadcast[untrained])  # the round's fixed factor stays


def test_a_robust_statistic_of_the_trained_factor_is_one_of_the_updates():
    """With A (or B) common, a coordinate-wise median of B_k is a median of the products' coefficients."""
    broadcast, uploads, _, new = _round(1, robust="median")
    for layer in LAYERS:
        b = f"m.{layer}.lora_B.weight"
        torch.testing.assert_close(new[b], torch.stack([u[b] for u in uploads]).median(dim=0).values)


@pytest.mark.slow
def test_a_real_run_alternates_the_factor_it_moves(tmp_path):
    """Two rounds of the quickstart: round 1 moves B and not A, round 2 moves A and not B."""
    overrides = [
        "strategy.name=rolora", "federation.clients=2", "federation.min_clients=2", "federation.rounds=2",
        "client.local_steps=2", "data.eval_max_examples=30", "data.partition.kind=iid", "model.max_length=32",
    ]  # fmt: skip
    result = run_cli("simulate", "simulations/configs/quickstart.yaml", *sum((["--set", o] for o in overrides), []),
                     "--out", str(tmp_path / "run"), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in records] == [2, 2]
    first, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-1")
    second, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-2")
    for role, moved in (("lora_A", True), ("lora_B", False)):
        names = [n for n in first if role_of(n) == role]
        assert names
        assert any(not torch.equal(first[n], second[n]) for n in names) == moved, role
    b_names = [n for n in first if role_of(n) == "lora_B"]
    assert all(first[n].abs().sum() > 0 for n in b_names)  # round 1 moved B from peft's zero init
    assert records[1]["bytes_up"] == records[0]["bytes_up"]  # A and B of the target modules are the same size
