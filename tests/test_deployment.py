"""Deployment on loopback: ``fedtune coordinator`` and ``fedtune client`` agents as separate processes.

The same config is also simulated, and the two run directories must agree. Faults are real:
agents and the coordinator are killed with SIGKILL, and refused agents must say why in one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from conftest import REPO, run_cli
from fedtune.core.processes import free_port
from fedtune.core.records import read_records
from fedtune.engine.data import holdout_split

pytestmark = pytest.mark.slow

CONFIG = "simulations/configs/quickstart.yaml"
SMALL = [
    "--set",
    "federation.round_timeout=180",  # a hung round fails the test instead of CI
    "--set",
    "data.partition.kind=iid",
    "--set",
    "client.local_steps=3",
    "--set",
    "data.eval_max_examples=120",
    "--set",
    "federation.clients=3",
]


def fedtune(*args: str, log: Path) -> subprocess.Popen:
    """Start a fedtune command in the background, output to LOG."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedtune.cli", *args],
        cwd=REPO,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def rounds_done(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{log} did not finish:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Per-client data files, a development CA, and three registered agent keys (plus one stranger)."""
    root = tmp_path_factory.mktemp("site")
    result = run_cli("partition", CONFIG, *SMALL, "--out", str(root / "data"))
    assert result.returncode == 0, result.stderr
    assert run_cli("certs", str(root / "certs")).returncode == 0
    assert run_cli("certs", str(root / "other-ca")).returncode == 0
    (root / "keys").mkdir()
    for name in ["client-0", "client-1", "client-2"]:
        assert run_cli("keygen", str(root / "keys" / name)).returncode == 0
    assert run_cli("keygen", str(root / "stranger")).returncode == 0
    return root


def agent(
    site: Path,
    index: int,
    address: str,
    log_dir: Path,
    tls: bool = True,
    mode: str | None = None,
    state_dir: Path | None = None,
    **overrides: Path,
) -> subprocess.Popen:
    """Agent client-INDEX on its partition; its output goes to LOG_DIR/client-INDEX.log."""
    name = f"client-{index}"
    log_dir.mkdir(parents=True, exist_ok=True)
    args = ["client", "--coordinator", address, "--data", str(site / "data" / f"{name}.jsonl"), "--name", name]
    args += ["--mode", mode] if mode else []
    args += ["--state-dir", str((state_dir or log_dir / "agents") / name)]
    if tls:
        args += ["--ca-cert", str(overrides.get("ca", site / "certs" / "ca.crt"))]
        args += ["--key", str(overrides.get("key", site / "keys" / name))]
    else:
        args.append("--insecure")
    return fedtune(*args, log=log_dir / f"{name}.log")


ZO_SEEDS = ["--set", "client.zo_upload=seeds"]  # agent client-2 trains zeroth-order and uploads seeds


@pytest.fixture(scope="module")
def secure_run(site, tmp_path_factory):
    """Coordinator with TLS and authentication + 3 agents (one ZO), 2 rounds; two refused agents try to join."""
    work = tmp_path_factory.mktemp("secure")
    address = f"127.0.0.1:{free_port()}"
    run = work / "run"
    coordinator = fedtune(
        "coordinator", CONFIG, *SMALL, *ZO_SEEDS, "--set", "federation.rounds=2", "--set", "federation.min_clients=3",
        "--address", address, "--out", str(run), "--certs", str(site / "certs"),
        "--authorized-keys", str(site / "keys"), log=work / "coordinator.log",
    )  # fmt: skip
    wait_for(lambda: "waiting for" in (work / "coordinator.log").read_text(), 120, "the coordinator to listen")
    agents = [agent(site, i, address, work, mode="zo" if i == 2 else None) for i in range(3)]
    strangers = {
        "unregistered": (agent(site, 0, address, work / "unregistered", key=site / "stranger"), "client-0"),
        "wrong-ca": (agent(site, 1, address, work / "wrong-ca", ca=site / "other-ca" / "ca.crt"), "client-1"),
    }
    try:
        output = finish(coordinator, work / "coordinator.log")
        refused = {
            kind: (process.wait(timeout=120), (work / kind / f"{name}.log").read_text())
            for kind, (process, name) in strangers.items()
        }
        members = [(process.wait(timeout=120), (work / f"client-{i}.log").read_text()) for i, process in enumerate(agents)]
    finally:
        stop(*agents, *(process for process, _ in strangers.values()))
    return run, coordinator.returncode, output, refused, members


def test_secure_deployment_writes_a_complete_run_directory(secure_run):
    run, code, output, *_ = secure_run
    assert code == 0, output
    assert "TLS, 3 authorized agent keys" in output
    assert [line.split("|")[0].split()[1] for line in output.splitlines() if line.startswith("round ")] == [
        "1/2",
        "2/2",
    ]
    for path in ["config.yaml", "metrics.jsonl", "summary.json", "plots/metrics.png", "logs/superlink.log"]:
        assert (run / path).is_file(), path
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-1", "round-2"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"], r["zo_clients"]) for r in records] == [(1, 3, 1), (2, 3, 1)]
    assert not list(run.rglob("*.db"))  # the SuperLink's state lived in memory: no agent bytes left on disk
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_deployment_matches_a_simulation_of_the_same_config(secure_run, tmp_path):
    run, code, output, *_ = secure_run
    assert code == 0, output
    simulated = tmp_path / "sim"
    result = run_cli("simulate", CONFIG, *SMALL, *ZO_SEEDS, "--set", "client.zo_clients=[2]", "--set",
                     "federation.rounds=2", "--set", "federation.min_clients=3", "--out", str(simulated),
                     timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    def metrics(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    for deployed, local in zip(metrics(run), metrics(simulated), strict=True):
        assert deployed["bytes_down"] == local["bytes_down"]
        # replies carry the client's process tag (host:pid), whose length varies by a few bytes
        assert deployed["bytes_up"] == pytest.approx(local["bytes_up"], abs=30)
        assert deployed["train_loss"] == pytest.approx(local["train_loss"], rel=1e-5)
        assert deployed["eval_accuracy"] == pytest.approx(local["eval_accuracy"], abs=0.01)
    adapters = [load_file(p / "checkpoints" / "round-2" / "adapter_model.safetensors") for p in (run, simulated)]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-6)


def test_agents_say_what_they_do_in_a_few_lines_and_exit_when_the_run_ends(secure_run):
    """Issue 16: a short line per event on the agent's terminal, none of Flower's, and exit 0 at the end."""
    for code, log in secure_run[4]:
        lines = log.strip().splitlines()
        assert code == 0, log
        assert len(lines) <= 12 and not any("DEBUG" in line or "INFO" in line for line in lines), log
        assert any("connected to" in line for line in lines), log
        for expected in ("round 1 trained", "round 2 trained", "round 2 evaluated", "run finished (completed"):
            assert any(expected in line for line in lines), (expected, log)


def test_unregistered_agent_is_refused_with_one_clear_line(secure_run):
    code, log = secure_run[3]["unregistered"]
    assert code != 0
    error = [line for line in log.splitlines() if line.startswith("fedtune: error:")]
    assert len(error) == 1 and "refused this agent's key" in error[0] and "stranger.pub" in error[0], log
    assert "Traceback" not in log


def test_agent_with_the_wrong_ca_is_refused_with_one_clear_line(secure_run):
    code, log = secure_run[3]["wrong-ca"]
    assert code != 0
    error = [line for line in log.splitlines() if line.startswith("fedtune: error:")]
    assert len(error) == 1 and "cannot verify the coordinator's certificate" in error[0], log
    assert "Traceback" not in log


def test_agent_without_a_ca_certificate_is_told_how_to_get_one(site):
    data, key = site / "data" / "client-0.jsonl", site / "keys" / "client-0"
    result = run_cli("client", "--coordinator", "127.0.0.1:9", "--data", str(data), "--key", str(key))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "fedtune: error: TLS is on by default: pass --ca-cert CA.crt (from the coordinator's fedtune certs), "
        "or --insecure for a plain-text try-out"
    ]


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(delta)


def test_run_finishes_when_an_agent_dies_in_round_two(site, tmp_path):
    """With client-level DP: the round that lost a client is kept, and charged like any other."""
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    coordinator = fedtune(
        "coordinator", CONFIG, *SMALL, "--set", "federation.rounds=3", "--set", "federation.min_clients=2",
        "--set", "federation.join_timeout=120",  # all three agents are in round 1
        "--set", "privacy.mode=client", "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.clip_norm=10",
        "--address", address, "--out", str(run), "--insecure", log=tmp_path / "coordinator.log",
    )  # fmt: skip
    agents = [agent(site, i, address, tmp_path, tls=False) for i in range(3)]
    try:
        wait_for(lambda: rounds_done(run) == [1], 300, "round 1")
        agents[2].send_signal(signal.SIGKILL)  # mid-way: round 2 has just been sent out
        output = finish(coordinator, tmp_path / "coordinator.log")
    finally:
        stop(*agents)
    assert coordinator.returncode == 0, output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    private = [json.loads(line) for line in (run / "logs" / "private-metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [r["round"] for r in private] == [1, 2, 3]
    assert private[0]["clients"] == 3 and private[2]["clients"] == 2
    assert all("clients" not in r and "train_loss" not in r for r in records)  # un-noised: not for publication
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    for done, record in enumerate(records, start=1):  # every round at the sampling rate q = 1
        assert record["epsilon"] == pytest.approx(opacus_epsilon([(1.0, 1.0, done)]), rel=0.01)


def test_killed_coordinator_resumes_after_its_last_round(site, tmp_path):
    """With DP-SGD on the agents: their privacy ledgers outlive both restarts."""
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    common = ["--address", address, "--insecure"]
    first = fedtune(
        "coordinator", CONFIG, *SMALL, "--set", "federation.rounds=3", "--set", "federation.min_clients=3",
        "--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1.0",
        "--out", str(run), *common, log=tmp_path / "coordinator-1.log",
    )  # fmt: skip
    agents = [agent(site, i, address, tmp_path, tls=False) for i in range(3)]
    try:
        wait_for(lambda: rounds_done(run) == [1], 300, "round 1")
        flower = psutil.Process(first.pid).children(recursive=True)  # SuperLink, superexec, ServerApp, flwr run
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        wait_for(lambda: not any(map(alive, flower)), 20, "the killed coordinator's Flower processes to stop")
        stop(*agents)  # the agents are restarted too (same state dirs), as an operator would
        resumed = fedtune("coordinator", "--resume", str(run), *common, log=tmp_path / "coordinator-2.log")
        wait_for(lambda: "waiting for" in (tmp_path / "coordinator-2.log").read_text(), 120, "the coordinator")
        agents = [
            agent(site, i, address, tmp_path / "restarted", tls=False, state_dir=tmp_path / "agents") for i in range(3)
        ]
        output = finish(resumed, tmp_path / "coordinator-2.log")
    finally:
        stop(*agents)
    assert resumed.returncode == 0, output
    assert "after round 1" in output
    for i in range(3):  # each agent judged its clip on its own data, once: before its first DP-SGD round
        assert "max_grad_norm 1 clips most examples" in (tmp_path / f"client-{i}.log").read_text()
        assert "max_grad_norm" not in (tmp_path / "restarted" / f"client-{i}.log").read_text()
    assert rounds_done(run) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-1", "round-2", "round-3"]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for name, epsilon in final["client_epsilon"].items():
        rows = list(read_records(str(site / "data" / f"{name}.jsonl")))
        rate = 16 / len(holdout_split(rows, 0.1, seed=f"0:{name}")[0])
        # three rounds of 3 steps; a fourth if round 2 was trained before the kill and then again
        assert opacus_epsilon([(1.0, rate, 9)]) * 0.99 <= epsilon <= opacus_epsilon([(1.0, rate, 12)]) * 1.01
