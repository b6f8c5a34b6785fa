"""Starting a SuperLink where a killed coordinator's Flower processes may linger."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from fedtune.coordinator.superlink import SuperLink
from fedtune.core.processes import free_port


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


HANGS_ON_EXIT = """
import signal, sys, threading
from fedtune.core.processes import exit_when_orphaned
signal.signal(signal.SIGINT, signal.SIG_IGN)  # like a ServerApp whose exit handler waits on a dead SuperLink
exit_when_orphaned(grace=0.5)
open(sys.argv[1], "w").close()
threading.Event().wait()
"""


def test_a_serverapp_whose_parent_was_killed_ends_even_when_its_exit_hangs(tmp_path):
    ready, child = tmp_path / "ready", None
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(300)",
         sys.executable, "-c", HANGS_ON_EXIT, str(ready)]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), "the child never started"
        (child,) = psutil.Process(parent.pid).children()
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait()
        child.wait(timeout=10)  # raises psutil.TimeoutExpired if the orphan lives on
    finally:
        parent.kill()
        if child is not None and child.is_running():
            child.kill()  # the orphan, which no longer is a child of this process
