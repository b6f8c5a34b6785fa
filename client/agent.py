"""``fedtune client``: a client agent on its own machine, with its own private data.

The agent is a Flower SuperNode (``flower-supernode --isolation process`` with a short
idle poll, client/supernode.py) plus this process, which executes the SuperNode's
ClientApp tasks in process (client/executor.py) so the base model is loaded once. The
data file never leaves the machine: only its path goes into the SuperNode's node
config, and only adapter tensors (or ZO seeds) and metrics are sent. TLS and SuperNode
authentication are on unless ``--insecure`` is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fedtune.core.errors import UserError
from fedtune.core.processes import die_with_parent, free_port, quiet_environment
from fedtune.core.records import read_records

if TYPE_CHECKING:
    from fedtune.client.executor import Deliveries


class Fatal(NamedTuple):
    """A SuperNode log line that means the agent cannot work, and what to tell the user."""

    kind: str
    pattern: re.Pattern[str]
    message: str


# In order of precedence: when several match before the SuperNode exits, the first one is said.
FATAL_PATTERNS = [
    Fatal(
        "tls-unverified",
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.I),
        "TLS: cannot verify the coordinator's certificate; pass --ca-cert with the coordinator's ca.crt",
    ),
    Fatal(
        "tls-plain",
        re.compile(r"WRONG_VERSION_NUMBER|wrong version number|record layer failure", re.I),
        "TLS: the coordinator does not speak TLS; it was started with --insecure, so start the agent with --insecure",
    ),
    Fatal(
        "key-refused",
        re.compile(r"\[code: 2004\]|Failed to activate SuperNode", re.I),
        "the coordinator refused this agent's key: give {public_key} to the coordinator operator "
        "(fedtune coordinator --authorized-keys)",
    ),
    Fatal(
        "bad-key",
        re.compile(r"Unable to parse the private key file", re.I),
        "--key {key}: not an OpenSSH EC private key (make one with fedtune keygen)",
    ),
    Fatal(
        "port-taken",
        re.compile(r"address already in use", re.I),
        "the SuperNode's local runtime port was taken by another program each time it started",
    ),
    Fatal(
        "unreachable",
        re.compile(r"Exit Code: 305", re.I),
        "cannot connect to the coordinator at {coordinator} (is it running, at that address and port?)",
    ),
]


@dataclass
class AgentSettings:
    coordinator: str
    data: Path
    name: str
    device: str
    state_dir: Path
    ca_cert: Path | None
    key: Path | None
    insecure: bool
    threads: int | None = None
    mode: str = ""  # backprop, zo or auto; empty: the run's client.mode
    memory_budget_mb: float = 0.0  # for auto; 0: what the machine has available
    serve: bool = False  # keep serving after a run ends (for later runs); default: exit 0 with the run
    rank: int | str | None = None  # this agent's LoRA rank (strategies with per-client ranks), "auto"; None: the run's adapter.r


CONNECTED = re.compile(r"SuperNode ID: ")  # the SuperNode registered with the coordinator
RETRYING = re.compile(r"Connection attempt failed, retrying in ([\d.]+) seconds")
DELIVERED = re.compile(r"Sent successfully|Failed to send message|Ignoring reply message")  # one per reply
RETRY_NOTE_EVERY_S = 60.0  # the SuperNode retries every few seconds; the terminal hears of it once a minute

# Failures worth another SuperNode life, and the pause before it: a coordinator registers keys
# just after it starts listening; the local runtime port is chosen free, but another process (a
# second agent on the machine) can take it before the SuperNode binds it.
RETRIED = {"key-refused": 5.0, "port-taken": 0.0}
RETRIES = 3


def run_agent(settings: AgentSettings, echo=print) -> int:
    """Join the coordinator and serve ClientApp tasks until the run ends (or, with ``serve``, until
    stopped with Ctrl-C), or until refused."""
    _check(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    home = settings.state_dir / ".flwr"
    home.mkdir(exist_ok=True)
    os.environ["FLWR_HOME"] = str(home)  # the in-process executor installs the app here too
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    _log_flower_to(settings.state_dir / "agent.log")
    echo(
        f"fedtune: agent {settings.name} connecting to {settings.coordinator} with {settings.data} "
        f"(log: {settings.state_dir / 'agent.log'})"
    )
    if settings.insecure:
        echo("fedtune: WARNING: --insecure: plain-text connection, no TLS")
    for attempt in range(RETRIES + 1):
        failure = _serve(settings, home)
        if failure is None:
            return 0
        kind, message = failure
        if kind not in RETRIED or attempt == RETRIES:
            raise UserError(message)
        if kind == "key-refused":
            echo(f"fedtune: the coordinator refused this agent's key; trying again in {RETRIED[kind]:.0f}s")
        time.sleep(RETRIED[kind])
    return 0


def _serve(settings: AgentSettings, home: Path) -> tuple[str, str] | None:
    """One SuperNode life: (kind of failure, message) when it ended by itself, None when stopped."""
    from fedtune.client.executor import Deliveries, serve_clientapps

    port = free_port()
    secret = secrets.token_bytes(32)
    secret_file = settings.state_dir / ".superexec-secret"  # read by the SuperNode at start, then removed
    with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(secret)
    node_config = " ".join(
        f'{key}="{value}"'
        for key, value in (
            ("data-path", settings.data.resolve()),
            ("name", settings.name),
            ("state-dir", settings.state_dir.resolve()),
            ("device", settings.device),
            ("mode", settings.mode),
            ("memory-budget-mb", settings.memory_budget_mb),
            ("rank", "" if settings.rank is None else settings.rank),
        )
    )
    args = [
        sys.executable,
        "-m",
        "fedtune.client.supernode",
        "--superlink",
        settings.coordinator,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config,
        "--superexec-auth-secret-file",
        str(secret_file),
    ]
    args += ["--insecure"] if settings.insecure else ["--root-certificates", str(settings.ca_cert)]
    if settings.key:
        args += ["--auth-supernode-private-key", str(settings.key)]
    node = subprocess.Popen(
        args,
        env=quiet_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    stop = threading.Event()
    failure: list[tuple[str, str]] = []
    replies = Deliveries()
    log_path = settings.state_dir / "agent.log"
    watcher = threading.Thread(target=_watch, args=(node, log_path, settings, failure, stop, replies), daemon=True)
    watcher.start()
    try:
        _wait_for_listener(port, node, stop)
        secret_file.unlink(missing_ok=True)
        if not stop.is_set():
            serve_clientapps(
                f"127.0.0.1:{port}",
                stop,
                say=lambda line: print(line, flush=True),
                serve=settings.serve,
                replies=replies,
                secret=secret,
            )
    finally:
        secret_file.unlink(missing_ok=True)
        stop.set()
        _terminate(node)
        watcher.join(timeout=5)
    return failure[0] if failure else None


def _log_flower_to(path: Path) -> None:
    """Flower's own log lines (the executor's) go to the agent's log file, not the terminal."""
    from fedtune.core.flower_internals import supercore_logger  # noqa: F401  (installs Flower's console handler, replaced here)

    path.parent.mkdir(parents=True, exist_ok=True)
    flower = logging.getLogger("flwr")
    for handler in list(flower.handlers):
        flower.removeHandler(handler)
    flower.addHandler(logging.FileHandler(path))
    flower.propagate = False


def _check(settings: AgentSettings) -> None:
    if not settings.data.is_file():
        raise UserError(f"--data {settings.data}: no such file")
    rows = read_records(str(settings.data))  # a broken file is reported now, not in round 1
    if not settings.insecure and not (settings.ca_cert and settings.ca_cert.is_file()):
        raise UserError(
            "TLS is on by default: pass --ca-cert CA.crt (from the coordinator's fedtune certs), "
            "or --insecure for a plain-text try-out"
        )
    if settings.key and not settings.key.is_file():
        raise UserError(f"--key {settings.key}: no such file (make one with fedtune keygen {settings.key})")
    if not re.fullmatch(r"[\w.-]+", settings.name):
        raise UserError(f"--name {settings.name!r}: use letters, digits, '.', '_' or '-'")
    if not rows:
        raise UserError(f"--data {settings.data}: no rows")


def _watch(
    node: subprocess.Popen,
    log_path: Path,
    settings: AgentSettings,
    failure: list[tuple[str, str]],
    stop: threading.Event,
    replies: Deliveries,
) -> None:
    """Copy SuperNode output to the agent log; when it exits, say why in the most specific words."""
    public_key = settings.key.with_name(settings.key.name + ".pub") if settings.key else "the agent's public key"
    matched: set[int] = set()
    last_retry_note = 0.0
    with open(log_path, "a") as log:
        for line in node.stdout:
            log.write(line)
            log.flush()
            matched.update(i for i, fatal in enumerate(FATAL_PATTERNS) if fatal.pattern.search(line))
            if DELIVERED.search(line):
                replies.count_one()
            elif CONNECTED.search(line):
                print(f"fedtune: connected to {settings.coordinator}; waiting for a round", flush=True)
            elif (retry := RETRYING.search(line)) and time.time() - last_retry_note > RETRY_NOTE_EVERY_S:
                last_retry_note = time.time()
                print(
                    f"fedtune: coordinator {settings.coordinator} unreachable, retrying in {float(retry.group(1)):.1f} s",
                    flush=True,
                )
    if not stop.is_set():  # the SuperNode ended by itself: a fatal problem
        if matched:
            fatal = FATAL_PATTERNS[min(matched)]
            message = fatal.message.format(public_key=public_key, key=settings.key, coordinator=settings.coordinator)
            failure.append((fatal.kind, message))
        else:
            failure.append(("exited", f"the SuperNode exited (code {node.wait()}); see {log_path}"))
        stop.set()


def _wait_for_listener(port: int, node: subprocess.Popen, stop: threading.Event, timeout: float = 60.0) -> None:
    """Wait until NODE itself listens on PORT: another agent's SuperNode that took the port first
    must never receive this agent's executor (it would hand it the other agent's tasks)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and not stop.is_set():
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for c in psutil.Process(node.pid).net_connections(kind="tcp")
            ):
                return
        time.sleep(0.2)
    if not stop.is_set():
        raise UserError(f"the SuperNode did not open its runtime port {port} within {timeout:.0f}s")


def _terminate(node: subprocess.Popen) -> None:
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.kill()
