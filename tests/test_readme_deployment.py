"""The README's deployment commands, copied out of README.md and run as written.

"Running across machines": the coordinator's host and three agents' machines are network
namespaces with their own directories, homes and host names; the agents reach the
coordinator by the name in its certificate. "Several agents on one machine": the block as
is, in a namespace of its own (so its fixed port 9092 is free). Runs are shrunk only
through ``FEDTUNE_SET``, which the README documents. After each block, no process is left.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import REPO, shared_data
from hosts import Hosts

pytestmark = pytest.mark.slow

SECTION = "## Running across machines"
COORDINATOR_NAME = "coord.example.org"  # the host name the README's commands use
AGENTS = ["acme", "globex", "initech"]
ROWS_PER_AGENT = 80


def readme_blocks() -> dict[str, str]:
    """The bash blocks of the README's deployment section, by the step each one is."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    steps = {
        "keygen": "fedtune keygen",
        "coordinator": "fedtune certs",
        "join": "fedtune client --coordinator coord",
        "one machine": "fedtune partition",
    }
    found = {step: [b for b in blocks if marker in b] for step, marker in steps.items()}
    assert all(len(matches) == 1 for matches in found.values()), found
    return {step: matches[0] for step, matches in found.items()}


def checkout_view(directory: Path) -> None:
    """What a host running the README from a checkout sees: its configs (not its files' state)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "simulations").symlink_to(REPO / "simulations")


def wait_for(condition, seconds: float, what: str, process=None) -> None:
    deadline = time.time() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_running_across_machines_as_the_readme_says(tmp_path):
    train, dev = shared_data("sst2", "train.tsv"), shared_data("sst2", "dev.tsv")
    blocks = readme_blocks()
    shrink = {
        "FEDTUNE_SET": ";".join([
            "federation.clients=3", "federation.min_clients=3", "federation.rounds=2", "federation.eval_every=1",
            "client.local_steps=2", f"data.train={train}", f"data.eval={dev}", "data.eval_max_examples=64",
        ])  # fmt: skip
    }
    rows = train.read_text().splitlines()
    with Hosts(tmp_path, "coordinator", AGENTS, hub_names=(COORDINATOR_NAME,)) as hosts:
        coordinator_dir = hosts.directory("coordinator")
        checkout_view(coordinator_dir)
        for agent in AGENTS:
            keygen = hosts.shell(agent, blocks["keygen"], {}, tmp_path / f"{agent}-keygen.log")
            assert keygen.wait(timeout=60) == 0, (tmp_path / f"{agent}-keygen.log").read_text()
            (coordinator_dir / "keys").mkdir(exist_ok=True)  # the operator collects the .pub files
            shutil.copy(hosts.home(agent) / ".fedtune" / f"{agent}.pub", coordinator_dir / "keys" / f"{agent}.pub")

        coordinator_log = tmp_path / "coordinator.log"
        coordinator = hosts.shell("coordinator", blocks["coordinator"], shrink, coordinator_log)
        wait_for(lambda: "waiting for" in coordinator_log.read_text(), 180, "the coordinator", coordinator)

        agents = {}
        for index, agent in enumerate(AGENTS):
            directory = hosts.directory(agent)
            shutil.copy(coordinator_dir / "certs" / "ca.crt", directory / "ca.crt")
            part = rows[1 + index * ROWS_PER_AGENT : 1 + (index + 1) * ROWS_PER_AGENT]
            (directory / "our-reviews.tsv").write_text("\n".join([rows[0], *part]) + "\n")
            agents[agent] = hosts.shell(agent, blocks["join"], {}, tmp_path / f"{agent}.log")

        assert coordinator.wait(timeout=600) == 0, coordinator_log.read_text()
        for agent, process in agents.items():
            assert process.wait(timeout=120) == 0, (tmp_path / f"{agent}.log").read_text()
            assert hosts.processes(agent) == [], f"{agent} left processes behind"
            terminal = (tmp_path / f"{agent}.log").read_text()
            assert "fedtune: run finished (completed" in terminal, terminal

    run = coordinator_dir / "runs" / "sst2-deployed"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in records] == [(1, 3), (2, 3)]
    assert not any(r.get("rejected") for r in records), records
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_several_agents_on_one_machine_as_the_readme_says(tmp_path):
    block = readme_blocks()["one machine"]
    with Hosts(tmp_path, "laptop", []) as hosts:
        checkout_view(hosts.directory("laptop"))
        log = tmp_path / "laptop.log"
        shell = hosts.shell("laptop", block, {"FEDTUNE_SET": "federation.rounds=2;client.local_steps=2"}, log)
        assert shell.wait(timeout=900) == 0, log.read_text()  # `wait` returned: every agent exited by itself
        assert hosts.processes("laptop") == [], "processes left behind after `wait`"
    summaries = list((hosts.directory("laptop") / "runs").glob("*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["status"] == "completed"
    output = log.read_text()
    assert output.count("fedtune: run finished (completed") == 5, output
