"""Starting a SuperLink where a killed coordinator's Flower processes may linger."""

from __future__ import annotations

import subprocess
import sys

from fedtune.coordinator.superlink import SuperLink
from fedtune.processes import free_port


def pretend_flower_process(port: int) -> subprocess.Popen:
    """A process with a ServerApp's command line, aimed at PORT, that would otherwise live for minutes."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", "--runtime-api-address", f"127.0.0.1:{port}"]
    )


def test_superlink_stops_leftovers_aimed_at_its_port_and_nothing_else(tmp_path):
    port, other_port = free_port(), free_port()
    leftover, bystander = pretend_flower_process(port), pretend_flower_process(other_port)
    try:
        # the Runtime API (what a ServerApp or superexec dials) is the loopback port
        with SuperLink(simulation=False, local_port=port, log_file=tmp_path / "superlink.log") as link:
            assert link.process.poll() is None
            assert leftover.poll() is not None, "a process aimed at the new SuperLink's port survived its start"
            assert bystander.poll() is None
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait()
