"""The deployment's promise, tried as an outsider, a hostile coordinator and a hostile agent would.

- Control plane: from another network namespace holding the CA, only SuperNode traffic
  reaches the coordinator; Flower's own CLI (list runs, register a key, submit an app)
  gets nothing.
- Code: an agent runs nothing of a foreign app; a coordinator runs no foreign ServerApp.
- Identity, hygiene and preflight: a hostile agent cannot speak for another; rejection
  reasons and checkpoints hold no paths, data values or host names; an agent whose data
  does not fit the run leaves with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_deployment import CONFIG, SMALL, agent, fedtune, finish, stop, wait_for

from conftest import REPO, run_cli
from fedtune.coordinator.superlink import SuperLink
from fedtune.core.processes import free_port, quiet_environment, tool_path
from hosts import Hosts

pytestmark = pytest.mark.slow

FOREIGN_APP = REPO / "tests" / "foreign_app"


def submit_foreign_app(home: Path, connection: str, markers: Path) -> subprocess.Popen:
    """``flwr run`` of the foreign app through the flwr configuration in HOME."""
    return subprocess.Popen(
        [tool_path("flwr"), "run", str(FOREIGN_APP), connection, "--run-config", f'marker-dir="{markers}"'],
        env=quiet_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_an_agent_runs_nothing_of_a_foreign_app(tmp_path):
    """A hostile coordinator (plain Flower SuperLink) submits its own app: the agent refuses it unread."""
    home, markers = tmp_path / "hostile-home", tmp_path / "markers"
    home.mkdir()
    markers.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hostile"\n\n[superlink.hostile]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    link = subprocess.Popen(
        [tool_path("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)],
        env=quiet_environment(home), stdout=open(tmp_path / "superlink.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    data = tmp_path / "private.jsonl"
    data.write_text('{"text": "our secret customer note", "label": "complaint"}\n' * 20)
    state = tmp_path / "agent-state"
    member = fedtune(
        "client", "--coordinator", f"127.0.0.1:{port}", "--insecure", "--data", str(data), "--name", "acme",
        "--state-dir", str(state), log=tmp_path / "agent.log",
    )  # fmt: skip
    try:
        time.sleep(3)
        submitter = submit_foreign_app(home, "hostile", markers)
        wait_for(lambda: (markers / "replies.json").exists(), 180, "the foreign ServerApp's replies")
        submitter.kill()
    finally:
        stop(member, link)
    replies = json.loads((markers / "replies.json").read_text())
    assert (markers / "server-ran").exists()  # the hostile coordinator runs its own code on its own host
    assert not (markers / "client-ran").exists()
    assert replies and all(r["error"] and not r["loot"] for r in replies), replies
    assert all("secret" not in str(r) for r in replies)
    log = (tmp_path / "agent.log").read_text()
    assert re.search(r"refused run \d+: its app is not fedtune's own \(outsider/innocent-looking-app\)", log), log
    assert not list(state.rglob("foreign_client.py")), "the foreign FAB was installed"


def test_a_coordinator_runs_no_foreign_server_app(tmp_path):
    """Someone on the coordinator host submits another app to its SuperLink: superexec refuses it."""
    markers = tmp_path / "markers"
    markers.mkdir()
    with SuperLink(simulation=False, log_file=tmp_path / "superlink.log") as link:
        submitter = submit_foreign_app(link.home, "fedtune", markers)
        try:
            wait_for(lambda: "refused run" in (tmp_path / "superlink.log").read_text(), 60, "superexec's refusal")
        finally:
            submitter.kill()
        time.sleep(2)
    assert not (markers / "server-ran").exists()
    assert "its app is not fedtune's" in (tmp_path / "superlink.log").read_text()


# -- the control plane, across network namespaces -------------------------------------


def flwr_from_outside(hosts: Hosts, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        hosts.command("outsider", tool_path("flwr"), *args),
        env=quiet_environment(home),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_only_the_fleet_api_faces_the_network(tmp_path):
    """Coordinator in one namespace on 0.0.0.0, an outsider with the CA in another."""
    with Hosts(tmp_path / "hosts", "coordinator", ["outsider"]) as hosts:
        coordinator_ip = hosts.hub_address("outsider")
        assert run_cli("certs", str(tmp_path / "certs"), "--host", coordinator_ip).returncode == 0
        (tmp_path / "keys").mkdir()
        assert run_cli("keygen", str(tmp_path / "keys" / "acme")).returncode == 0
        assert run_cli("keygen", str(tmp_path / "outsider")).returncode == 0
        data = tmp_path / "acme.jsonl"
        result = run_cli("partition", CONFIG, *SMALL, "--out", str(tmp_path / "parts"))
        assert result.returncode == 0, result.stderr
        data.write_text((tmp_path / "parts" / "client-0.jsonl").read_text())
        run = tmp_path / "run"
        coordinator = subprocess.Popen(
            hosts.command(
                "coordinator", sys.executable, "-m", "fedtune.cli", "coordinator", CONFIG, *SMALL,
                "--set", "federation.clients=1", "--set", "federation.min_clients=1", "--set", "federation.rounds=1",
                "--address", "0.0.0.0:9092", "--certs", str(tmp_path / "certs"),
                "--authorized-keys", str(tmp_path / "keys"), "--out", str(run),
            ),
            cwd=REPO, stdout=open(tmp_path / "coordinator.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        member = None
        try:
            wait_for(lambda: "waiting for" in (tmp_path / "coordinator.log").read_text(), 120, "the coordinator")
            listening = subprocess.run(hosts.command("coordinator", "ss", "-Hltn"), capture_output=True, text=True)
            addresses = [line.split()[3] for line in listening.stdout.splitlines()]
            public = [a for a in addresses if not a.startswith(("127.0.0.1:", "[::1]:"))]
            assert public == ["0.0.0.0:9092"], addresses  # every other API listens on loopback only

            home = tmp_path / "outsider-home"
            home.mkdir()
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "{coordinator_ip}:9092"\n'
                f'root-certificates = "{tmp_path / "certs" / "ca.crt"}"\n'
            )
            attempts = {
                "ls": flwr_from_outside(hosts, home, "ls", "c"),
                "register": flwr_from_outside(hosts, home, "supernode", "register", str(tmp_path / "outsider.pub"), "c"),
                "run": flwr_from_outside(hosts, home, "run", str(FOREIGN_APP), "c", "--run-config", 'marker-dir="/tmp"'),
            }
            for what, attempt in attempts.items():
                assert attempt.returncode != 0 and "404" in attempt.stdout + attempt.stderr, (what, attempt.stdout)

            member = subprocess.Popen(
                hosts.command(
                    "outsider", sys.executable, "-m", "fedtune.cli", "client",
                    "--coordinator", f"{coordinator_ip}:9092", "--data", str(data), "--name", "acme",
                    "--ca-cert", str(tmp_path / "certs" / "ca.crt"), "--key", str(tmp_path / "keys" / "acme"),
                    "--state-dir", str(tmp_path / "agent"),
                ),
                cwd=REPO, stdout=open(tmp_path / "agent.log", "w"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            output = finish(coordinator, tmp_path / "coordinator.log", timeout=400)
        finally:
            for process in filter(None, (member, coordinator)):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=30)
    assert coordinator.returncode == 0, output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in records] == [(1, 1)]  # SuperNode traffic does pass


# -- identity, hygiene, preflight: one deployed run with a liar and a misfit ----------------


def test_agents_cannot_speak_for_others_and_misfits_leave_with_one_line(tmp_path):
    """Sample-level DP run with keys: client-2 claims to be client-0 with a spent budget; client-3's data
    has a label the run does not know. The run goes on with client-0 and client-1."""
    run_dir, work = tmp_path / "run", tmp_path
    assert run_cli("certs", str(work / "certs")).returncode == 0
    (work / "keys").mkdir()
    for index in range(4):
        assert run_cli("keygen", str(work / "keys" / f"client-{index}")).returncode == 0
    result = run_cli("partition", CONFIG, *SMALL, "--out", str(work / "data"))
    assert result.returncode == 0, result.stderr
    misfit = work / "data" / "client-3.jsonl"
    misfit.write_text('{"text": "ACME-SECRET-4711 please refund", "label": "refund"}\n' * 30)
    address = f"127.0.0.1:{free_port()}"
    coordinator = fedtune(
        "coordinator", CONFIG, *SMALL, "--set", "federation.clients=4", "--set", "federation.min_clients=2",
        "--set", "federation.rounds=2", "--set", "federation.join_timeout=90",
        "--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1.0",
        "--address", address, "--out", str(run_dir), "--certs", str(work / "certs"),
        "--authorized-keys", str(work / "keys"), log=work / "coordinator.log",
    )  # fmt: skip
    wait_for(lambda: "waiting for" in (work / "coordinator.log").read_text(), 120, "the coordinator to listen")
    site = work  # agent() reads site/data/client-K.jsonl, site/certs/ca.crt, site/keys/client-K
    honest = [agent(site, i, address, work) for i in (0, 1)]
    liar_args = [
        "client", "--coordinator", address, "--data", str(work / "data" / "client-2.jsonl"), "--name", "client-2",
        "--state-dir", str(work / "agents" / "client-2"), "--ca-cert", str(work / "certs" / "ca.crt"),
        "--key", str(work / "keys" / "client-2"),
    ]  # fmt: skip
    liar = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "hostile_agent.py"), "client-0", *liar_args],
        cwd=REPO, stdout=open(work / "liar.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    misfit_agent = agent(site, 3, address, work)
    try:
        output = finish(coordinator, work / "coordinator.log")
        misfit_code = misfit_agent.wait(timeout=120)
    finally:
        stop(*honest, liar, misfit_agent)
    assert coordinator.returncode == 0, output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in records] == [(1, 2), (2, 2)]
    assert sorted(records[-1]["client_epsilon"]) == ["client-0", "client-1"]
    rejected = [reason for r in records for reason in r.get("rejected", [])]
    assert "client-2: claims another name (its key is registered as client-2)" in rejected, rejected
    assert any(r.startswith("client-3: its data does not match the run") for r in rejected), rejected
    state = json.loads((run_dir / "checkpoints" / "round-2" / "fedtune.json").read_text())
    assert state["budget_spent"] == []  # client-0 was not retired by the liar

    misfit_log = (work / "client-3.log").read_text()
    errors = [line for line in misfit_log.splitlines() if line.startswith("fedtune: error:")]
    assert misfit_code != 0 and len(errors) == 1 and "'refund' is not one of the run's labels" in errors[0]
    assert "Traceback" not in misfit_log

    # nothing the coordinator wrote holds an agent's data, its paths, or its host
    written = "".join(p.read_text() for p in run_dir.rglob("*") if p.suffix in (".json", ".jsonl", ".yaml", ".log"))
    for private in ("ACME-SECRET", str(misfit), str(work / "data")):
        assert private not in written, private
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoints/*/fedtune.json")]
    assert all(":" not in process for state in states for process in state["client_loads"])  # no host:pid


def test_oversized_requests_are_refused_before_flower_reads_them(tmp_path):
    """Finding 8: a 200 MB upload made the coordinator peak at 2.5 GB and stayed in its database."""
    import http.client

    cap = 2**20
    with SuperLink(simulation=False, log_file=tmp_path / "superlink.log", max_request_bytes=cap) as link:
        process = psutil.Process(link.process.pid)
        before = process.memory_info().rss

        def post(path: str, body: bytes, chunked: bool = False) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", link.port, timeout=30)
            try:
                headers = {"Content-Type": "application/protobuf"}
                if chunked:
                    connection.request("POST", path, body=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
                                       headers=headers, encode_chunked=True)  # fmt: skip
                else:
                    connection.request("POST", path, body=body, headers=headers)
                return connection.getresponse().status
            except (BrokenPipeError, ConnectionResetError):
                return 413  # refused while the body was still being sent
            finally:
                connection.close()

        payload = os.urandom(200 * 2**20)
        assert post("/v1/fleet/push-object", payload) == 413
        assert post("/v1/fleet/push-object", payload[: 8 * cap], chunked=True) == 413
        assert post("/v1/control/list-runs", b"") == 404  # the Control API is not on the public port
        assert post("/v1/fleet/push-object", b"\x00" * 100) not in (404, 413)  # Flower itself answers this one
        assert process.memory_info().rss - before < 50 * 2**20
    assert not list(tmp_path.rglob("*.db"))  # the SuperLink keeps its state in memory only


def _strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_malformed_replies_never_crash_a_run_nor_reach_its_records(tmp_path):
    """Findings 2 and 6, end to end on Flower's Simulation Engine: inf counts, a negative layout,
    a NaN loss and an absurd evaluate accuracy each cost only their own reply."""
    run = tmp_path / "run"
    result = run_cli(
        "simulate", CONFIG, *SMALL, "--set", "federation.clients=4", "--set", "federation.min_clients=2",
        "--set", "federation.rounds=2", "--out", str(run), "--app", str(REPO / "tests" / "malformed_app"),
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in records] == [(1, 2), (2, 2)]  # partitions 2 and 3 count
    first, second = (r["rejected"] for r in records)
    assert any(r.startswith("client-0:") and "num-examples" in r for r in first), first
    assert any(r.startswith("client-1:") and "loss" in r for r in first), first
    assert any(r.startswith("client-0:") and "layout" in r for r in second), second
    assert all(0.0 <= r["client_accuracy"] <= 1.0 for r in records)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
