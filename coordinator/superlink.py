"""Starting a Flower SuperLink and submitting fedtune's app to it with ``flwr run``.

Both ``fedtune simulate`` (SuperLink with ``--simulation``: the Simulation Engine runs
the clients) and ``fedtune coordinator`` (a deployment SuperLink that client agents
join) go through here, so a run is the same Flower run either way. Runtime dependency
installation is always off: it would ``uv sync`` torch from PyPI (the CUDA build).
Each launcher gets its own ``FLWR_HOME`` so parallel runs never share Flower state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import psutil

from fedtune.coordinator.fleet_guard import ListenerLimits
from fedtune.core.app import APP_DIR
from fedtune.core.errors import UserError
from fedtune.core.processes import die_hard_with_parent, free_port, quiet_environment, terminate, tool_path

CONNECTION = "fedtune"
MARKER = "[fedtune]"  # prefix of the ServerApp's lines meant for the user (coordinator/report.py)
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # listening everywhere: dial loopback


def log_and_echo(log: TextIO, echo: Callable[[str], None]) -> Callable[[str], None]:
    """A line handler for ``SuperLink.submit``: every Flower line to LOG, the ServerApp's
    own lines (without the marker) and errors also to ECHO."""

    def on_line(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        if MARKER in line:
            echo(line[line.index(MARKER) + len(MARKER) :].strip())
        elif "ERROR" in line or "[code:" in line:  # Flower's own error lines and boxed CLI errors
            echo(flower_message(line))

    return on_line


@dataclass
class Tls:
    """Certificates for the SuperLink's HTTPS endpoint (see ``fedtune certs``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class SuperLink:
    """A SuperLink subprocess plus a private flwr CLI configuration that reaches it.

    In simulation everything listens on loopback. Deployed, only the Fleet API listens
    on ``host:port`` (coordinator/superlink_main.py); the Control and Runtime APIs, which
    can register keys and start apps, listen on ``127.0.0.1:local_port``.
    """

    simulation: bool
    host: str = "127.0.0.1"
    port: int = 0
    tls: Tls | None = None
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None
    max_request_bytes: int = ListenerLimits.max_request_bytes  # deployment: the public Fleet API's largest request
    max_message_bytes: int = 64 * 2**20  # deployment: largest message (all its objects) an agent may push
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fedtune-flwr-")))
    process: subprocess.Popen | None = None
    local_port: int = 0  # Control and Runtime APIs (the public port itself in simulation)
    environment: dict[str, str] = field(default_factory=dict)  # for the SuperLink and what it starts

    def __enter__(self) -> SuperLink:
        self.port = self.port or free_port()
        if self.simulation:
            self.local_port = self.port
            args = [tool_path("flower-superlink"), "--host", self.host, "--port", str(self.port), "--simulation"]
        else:
            self.local_port = self.local_port or free_port()
            public = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            args = [
                sys.executable,
                "-m",
                "fedtune.coordinator.superlink_main",
                "--public-address",
                public,
                "--max-request-bytes",
                str(self.max_request_bytes),
                "--max-message-bytes",
                str(self.max_message_bytes),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.local_port),
            ]
        args += ["--disable-runtime-dependency-installation", *self.extra_args]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
            ]
        self._wait_until_free()
        self._stop_leftovers()
        self._write_cli_config()
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            args,
            env={**quiet_environment(self.home), **self.environment},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_hard_with_parent,
        )
        self._wait_until_listening()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def stop(self) -> None:
        """Stop the SuperLink and everything it started.

        Flower's superexec (and the Ray cluster of a simulation) run in sessions of their
        own, so the SuperLink's process group is not enough: its descendants are collected
        first and stopped after it.
        """
        if not self.process or self.process.poll() is not None:
            return
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        terminate(descendants, grace=5.0)

    def submit(
        self,
        run_config: dict[str, str],
        federation_config: dict[str, int | float] | None,
        on_line: Callable[[str], None],
        app_dir: Path = APP_DIR,
    ) -> int:
        """``flwr run`` a Flower App (fedtune's by default); stream its log lines; return its exit code."""
        overrides = self.home / "run-config.toml"
        overrides.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))
        args = [tool_path("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(overrides)]
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={v}" for k, v in federation_config.items())]
        process = subprocess.Popen(
            args,
            env=quiet_environment(self.home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=die_hard_with_parent,
        )
        assert process.stdout is not None
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        return process.wait()

    def register(self, public_key: Path, name: str) -> None:
        """Authorize a SuperNode's public key under NAME (Flower's ``flwr supernode register``)."""
        result = subprocess.run(
            [tool_path("flwr"), "supernode", "register", str(public_key), CONNECTION, "--name", name],
            env=quiet_environment(self.home),
            capture_output=True,
            text=True,
        )
        output = flower_message(result.stdout + result.stderr)
        if result.returncode != 0 and "already" not in output.lower():
            raise UserError(f"registering {public_key} failed: {output or f'exit code {result.returncode}'}")

    def _write_cli_config(self) -> None:
        lines = [
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n',
            f'address = "127.0.0.1:{self.local_port}"\n',
        ]
        if self.tls is None:
            lines.append("insecure = true\n")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert}"\n')
        (self.home / "config.toml").write_text("".join(lines))

    def _accepting(self, port: int | None = None) -> bool:
        """Whether something accepts connections on the public port (or PORT on loopback)."""
        if port is not None:
            address = ("127.0.0.1", port)
        else:
            address = (WILDCARDS.get(self.host, self.host), self.port)
        with socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET) as sock:
            return sock.connect_ex(address) == 0

    def _wait_until_free(self, timeout: float = 30.0) -> None:
        """A killed coordinator's SuperLink takes a moment to let go of the port: never mistake it for ours."""
        deadline = time.time() + timeout
        while self._accepting():
            if time.time() >= deadline:
                raise UserError(f"{self.host}:{self.port} is in use by another process; stop it or use another address")
            time.sleep(0.2)

    def _stop_leftovers(self) -> None:
        """Stop Flower processes of a killed launcher that still aim at this port.

        A ServerApp or superexec outlives its SuperLink by a few seconds; if ours were up by
        then, it would reconnect to it and act on the new run.
        """
        leftovers = []
        for process in psutil.process_iter(["cmdline"]):
            args = process.info["cmdline"] or []
            if "--runtime-api-address" in args[:-1]:
                target = args[args.index("--runtime-api-address") + 1]
                if target.rpartition(":")[2] == str(self.local_port):
                    leftovers.append(process)
        terminate(leftovers, grace=10.0)

    def _wait_until_listening(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise UserError(
                    f"the SuperLink exited at start (code {self.process.returncode}); "
                    f"see {self.log_file or 'its output'}"
                )
            if self._accepting() and self._accepting(self.local_port):
                return
            time.sleep(0.2)
        raise UserError(f"the SuperLink did not listen on {self.host}:{self.port} within {timeout:.0f}s")


def flower_message(output: str) -> str:
    """The words of a Flower CLI message, without the box its rich output draws around them."""
    lines = (line.strip(" │╭╮╰╯─┃━┏┓┗┛\t") for line in output.splitlines())
    return " ".join(line for line in lines if line)
