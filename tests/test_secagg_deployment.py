"""Secure aggregation deployed: TLS and registered agent keys, one agent killed after the key exchange.

Four agents on loopback, each its own process behind its own SuperNode, as in tests/test_deployment.py.
Agent client-3 is killed as soon as it has sent its share envelopes (round 1): the coordinator
rebuilds its first private key from the other three's shares, removes the pair masks it left in
their vectors, and the round counts the three that uploaded; round 2 runs without it.
"""

from __future__ import annotations

import json
import signal

import pytest
from test_deployment import CONFIG, SMALL, agent, fedtune, finish, stop, wait_for

from conftest import run_cli
from fedtune.core.processes import free_port

pytestmark = pytest.mark.slow

FOUR = [*SMALL, "--set", "federation.clients=4"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-site")
    assert run_cli("partition", CONFIG, *FOUR, "--out", str(root / "data")).returncode == 0
    assert run_cli("certs", str(root / "certs")).returncode == 0
    (root / "keys").mkdir()
    for i in range(4):
        assert run_cli("keygen", str(root / "keys" / f"client-{i}")).returncode == 0
    return root


def test_an_agent_killed_after_the_key_exchange_leaves_the_others_sum(site, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    coordinator = fedtune(
        "coordinator", CONFIG, *FOUR, "--set", "strategy.name=ffa", "--set", "federation.rounds=2",
        "--set", "federation.min_clients=3", "--set", "federation.secure_aggregation=secagg+",
        "--set", "federation.round_timeout=60", "--set", "federation.secagg_stage_timeout=30",
        "--set", "federation.join_timeout=120",
        "--address", address, "--out", str(run), "--certs", str(site / "certs"),
        "--authorized-keys", str(site / "keys"), log=tmp_path / "coordinator.log",
    )  # fmt: skip
    wait_for(lambda: "waiting for" in (tmp_path / "coordinator.log").read_text(), 120, "the coordinator to listen")
    agents = [agent(site, i, address, tmp_path) for i in range(4)]
    try:
        doomed = tmp_path / "client-3.log"
        wait_for(
            lambda: doomed.exists() and "secure aggregation: keys shared" in doomed.read_text(), 300, "key sharing"
        )
        agents[3].send_signal(signal.SIGKILL)
        output = finish(coordinator, tmp_path / "coordinator.log")
    finally:
        stop(*agents)
    assert coordinator.returncode == 0, output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in records] == [(1, 3), (2, 3)]
    assert records[0]["secagg_dropped"] == 1
    assert all(r["eval_accuracy"] > 0.3 for r in records)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    for i in range(3):
        assert "secure aggregation: shares sent" in (tmp_path / f"client-{i}.log").read_text()
