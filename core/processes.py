"""Processes fedtune starts (Flower's SuperLink, SuperNodes, ``flwr``): their environment,
their ports, and that they end with the fedtune process that started them.

Shared by the coordinator, the agents and the simulation launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil


def quiet_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process fedtune starts."""
    env = dict(os.environ)
    # Flower's processes start each other by name (the SuperLink runs flower-superexec): put
    # this environment's scripts first on PATH even when fedtune was run as .venv/bin/fedtune.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Run in a child before exec: the kernel sends it SIG when its parent dies (Linux).

    A coordinator or agent killed with SIGKILL then leaves no SuperLink holding its port
    and no SuperNode that still looks alive to the federation.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def die_hard_with_parent() -> None:
    """``die_with_parent`` with SIGKILL, for the SuperLink and ``flwr run``.

    On SIGTERM Flower 1.41's SuperLink waits, without limit, for open connections to close,
    and the orphaned ``flwr run --stream`` keeps one open: its superexec and ServerApp then
    live on, reconnect to the next SuperLink on the same port (a resumed coordinator's) and
    take over or fail its run. Killed outright, the SuperLink is gone at once, and Flower's
    own parent monitors stop the superexec and ServerApp within seconds.
    """
    die_with_parent(signal.SIGKILL)


def exit_when_orphaned(grace: float = 5.0, poll: float = 0.2) -> None:
    """End this process GRACE seconds after its parent died, whatever its main thread is doing.

    For the ServerApp. When its superexec dies, Flower's parent monitor interrupts it (SIGINT)
    and its exit handler pushes the final status and logs to the SuperLink. If that SuperLink
    is already gone (a SIGKILLed coordinator), the handler can wait on it without end, and the
    orphaned ServerApp outlives the run. A resumed coordinator on the same port could then meet
    it (seen in CI: it was still alive minutes after the kill). GRACE leaves Flower's clean
    exit its time first.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="fedtune-exit-when-orphaned", daemon=True).start()


# Flower 1.41's Simulation Engine hands messages to its virtual nodes by polling: every 0.1 s a
# thread asks for every node's next message, and each ask reads every stored message
# (vce_api.add_messages_to_queue). At 1,000 nodes and 200 messages in flight that keeps a core
# busy at nice 0, while Ray runs the client actors at nice 15: on a small machine the poll, not
# the clients, takes the CPU (BENCHMARKS.md, "Client-level DP against clients per round").
SIMULATION_POLLING_THREADS = ("add_messages_to_queue", "put_message_into_state")
LOWEST_PRIORITY = 19


def yield_to_clients(names: tuple[str, ...] = SIMULATION_POLLING_THREADS) -> int:
    """Put this process's threads whose name holds one of NAMES at the lowest CPU priority.

    Python names a thread after its target ("Thread-6 (add_messages_to_queue)"); Linux keeps a
    nice value per thread. Returns how many threads were lowered (0 outside a simulation).
    """
    lowered = 0
    for thread in threading.enumerate():
        if thread.native_id and any(name in thread.name for name in names):
            with contextlib.suppress(OSError):  # the thread ended in between
                os.setpriority(os.PRIO_PROCESS, thread.native_id, LOWEST_PRIORITY)
                lowered += 1
    return lowered


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(processes: list[psutil.Process], grace: float) -> None:
    """SIGTERM to PROCESSES, SIGKILL to those still running GRACE seconds later."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    for process in psutil.wait_procs(processes, timeout=grace)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def tool_path(name: str) -> str:
    """A Flower console script from the same environment as this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
