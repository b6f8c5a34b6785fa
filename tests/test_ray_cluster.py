"""``simulation.ray_address``: a simulation's clients run on an existing Ray cluster (how users go
past one machine), here a ``ray start --head`` cluster on loopback."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from conftest import run_cli
from fedtune.core.processes import free_port

pytestmark = pytest.mark.slow


def ray_tool() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head():
    """A one-node Ray cluster of our own, identified by its private temp dir."""
    temp_dir = Path(f"/tmp/fedtune-ray-{secrets.token_hex(3)}")  # Ray's socket paths must stay short
    port = free_port()
    start = subprocess.run(
        [
            ray_tool(),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        subprocess.run([ray_tool(), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def raylets() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "raylet" or any("raylet/raylet" in arg for arg in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_simulation_runs_its_clients_on_an_existing_ray_cluster(ray_head, tmp_path):
    address, temp_dir = ray_head
    ours = [p for p in raylets() if any(str(temp_dir) in arg for arg in p.cmdline())]
    assert len(ours) == 1
    seen: dict[str, set] = {"other raylets": set(), "actors on ours": set()}
    done = threading.Event()

    def watch() -> None:  # the clients are Ray actors: whose raylet started them?
        while not done.wait(0.5):
            for raylet in raylets():
                if raylet.pid != ours[0].pid:
                    seen["other raylets"].add(raylet.pid)
            for child in ours[0].children(recursive=True):
                try:
                    if "ClientAppActor" in " ".join(child.cmdline()) or child.name().startswith("ray::ClientApp"):
                        seen["actors on ours"].add(child.pid)
                except psutil.Error:
                    pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run = tmp_path / "run"
    result = run_cli(
        "simulate", "simulations/configs/quickstart.yaml", "--out", str(run),
        "--set", f"simulation.ray_address={address}", "--set", "simulation.client_cpus=1",
        "--set", "federation.rounds=1", "--set", "client.local_steps=2", "--set", "data.eval_max_examples=60",
        timeout=900,
    )  # fmt: skip
    done.set()
    watcher.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"clients run on the Ray cluster at {address}" in result.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert seen["actors on ours"], "no client actor ran under the cluster's raylet"
    assert not seen["other raylets"], "the simulation started a Ray of its own"


def test_a_malformed_ray_address_is_one_line(tmp_path):
    result = run_cli(
        "simulate", "simulations/configs/quickstart.yaml", "--out", str(tmp_path / "run"),
        "--set", "simulation.ray_address=http://head",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "simulation.ray_address" in result.stderr, result.stderr
    result = run_cli(
        "simulate", "simulations/configs/quickstart.yaml", "--out", str(tmp_path / "run"),
        "--set", "simulation.ray_address=127.0.0.1:6379",
    )  # fmt: skip
    assert result.returncode == 2 and "set client_cpus too" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
