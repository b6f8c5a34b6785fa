"""Every class in the registry goes through the same checks: a new strategy is one file plus its
registry line, and this file tells whether it keeps the contract the rest of fedtune relies on.

- its plans are consistent for any round, and the roles it broadcasts cover what it uploads;
- ``combine`` on random, well-formed replies gives finite tensors of the global shapes;
- malformed replies are rejected and never fail a round (hypothesis, as a hostile agent would send);
- its state survives a resume (checkpointed as JSON): the next round samples the same clients;
- one round of a real simulation runs (slow).
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from fedtune.core import wire
from fedtune.core.config import Config
from fedtune.core.plan import ROLES, role_of
from fedtune.strategies import STRATEGIES, build_strategy
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

NODES = [11, 12, 13]


def _start(rank: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    start = {"m.classifier.weight": torch.randn(3, 8, generator=generator), "m.classifier.bias": torch.zeros(3)}
    for layer in ("q", "v"):
        start[f"m.{layer}.lora_A.weight"] = torch.randn(rank, 8, generator=generator)
        start[f"m.{layer}.lora_B.weight"] = torch.randn(8, rank, generator=generator) * 0.1
    return start


def _strategy(name: str):
    config = Config.model_validate(
        {"strategy": {"name": name}, "adapter": {"r": 4}, "federation": {"clients": len(NODES), "min_clients": 2}}
    )
    return build_strategy(config)


def _replies(strategy, messages: list[Message], scale: float) -> list[Message]:
    """A well-formed reply to each message: the broadcast it carries, moved by SCALE, of what it must upload."""
    rank = strategy.rank if hasattr(strategy, "ranks") else None
    replies = []
    for index, message in enumerate(messages):
        sent = strategy.plan_for(1).sent
        tensors = {n: v + scale * torch.randn_like(v) for n, v in tensors_of(message).items() if role_of(n) in sent}
        info = {"frozen-checksum": strategy.frozen_checksum or ""} | ({"rank": rank} if rank else {})
        replies.append(reply(message, tensors, num_examples=10 + index, name=f"client-{index}", **info))
    return replies


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_plans_are_consistent_and_broadcasts_cover_uploads(name):
    cls, strategy = STRATEGIES[name], _strategy(name)
    assert cls.name == name and cls.plan.sent and cls.plan.trained
    for server_round in range(1, 5):
        plan = strategy.plan_for(server_round)
        assert plan.sent <= set(ROLES) and not plan.frozen & plan.trained and not plan.private & plan.sent
        assert plan.sent <= strategy.broadcast_roles(server_round), (name, server_round)
        assert plan.sent - {"head"} <= plan.trained | plan.frozen  # what travels is trained (or fixed at the seed)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_combine_on_random_replies_is_finite_and_keeps_the_global_shapes(name):
    enter_run()
    strategy, start = _strategy(name), _start()
    messages = strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid(NODES))
    arrays, metrics, ledger = play_round(strategy, _replies(strategy, messages, 0.05))
    assert arrays is not None and not ledger.rejected, ledger.rejected
    new = arrays.to_torch_state_dict()
    for tensor_name, value in start.items():
        assert new[tensor_name].shape == value.shape and torch.isfinite(new[tensor_name]).all(), tensor_name
    assert metrics["num-examples"] > 0


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_malformed_replies_are_rejected_by_every_strategy(data):
    """One field of one reply broken in a drawn way: that reply is rejected, the round goes on."""
    enter_run()
    name = data.draw(st.sampled_from(list(STRATEGIES)))
    strategy, start = _strategy(name), _start()
    messages = strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid(NODES))
    replies = _replies(strategy, messages, 0.05)
    broken = replies[0].content
    how = data.draw(st.sampled_from(["count", "shape", "nan", "junk-layout", "no-metrics", "extra-tensor"]))
    tensors = wire.decode(broken["arrays"], broken["layout"])
    first = next(iter(tensors))
    if how == "count":
        broken["metrics"] = MetricRecord({"num-examples": data.draw(st.sampled_from([0, -1, 10**12, 0.5]))})
    elif how == "shape":
        tensors[first] = torch.zeros(*tensors[first].shape, 2)
    elif how == "nan":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif how == "junk-layout":
        broken["layout"] = ConfigRecord({"codec": "none", "names": [first], "ndims": [1], "shape": [-3]})
    elif how == "no-metrics":
        del broken["metrics"]
    else:
        tensors["m.sneaky.lora_A.weight"] = torch.zeros(2, 2)
    if how in ("shape", "nan", "extra-tensor"):
        broken["arrays"], broken["layout"] = wire.encode(tensors).values()
    arrays, _, ledger = play_round(strategy, replies)
    assert [r.split(":")[0] for r in ledger.rejected] == ["client-0"], (name, how, ledger.rejected)
    assert arrays is not None and all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_state_survives_a_resume(name):
    enter_run()
    strategy, start = _strategy(name), _start()
    strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid(NODES + [14, 15]))
    resumed = _strategy(name)
    resumed.load_state_dict(json.loads(json.dumps(strategy.state_dict())))  # as the checkpoint stores it
    grid = StaticGrid(NODES + [14, 15, 16, 17])
    assert [m.metadata.dst_node_id for m in strategy.configure_train(2, ArrayRecord(start), ConfigRecord(), grid)] == [
        m.metadata.dst_node_id for m in resumed.configure_train(2, ArrayRecord(start), ConfigRecord(), grid)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_one_round_of_a_real_simulation(name, tmp_path):
    overrides = [
        f"strategy.name={name}", "federation.clients=2", "federation.min_clients=2", "federation.rounds=1",
        "client.local_steps=1",
        "data.eval_max_examples=30", "data.partition.kind=iid", "model.max_length=32",
    ]  # fmt: skip
    if STRATEGIES[name].plan.per_client_ranks:
        overrides.append("client.ranks=[2,8]")
    result = run_cli("simulate", "simulations/configs/quickstart.yaml", *sum((["--set", o] for o in overrides), []),
                     "--out", str(tmp_path / "run"), timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["clients"] == 2 and "rejected" not in record and 0.0 <= record["eval_accuracy"] <= 1.0
