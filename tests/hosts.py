"""Machines for deployment tests: network namespaces, each with its own directory, home and host name.

One hub (the coordinator's host) and spokes (agents' machines); each spoke reaches the
hub over its own veth pair, at the hub's address on that link, and resolves the hub's
host names through ``/etc/netns/SPOKE/hosts`` (``ip netns exec`` mounts it over
/etc/hosts). Only addresses inside these namespaces are used. Where namespaces cannot
be made (not root, no ``ip``), the test is skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NETNS_ETC = Path("/etc/netns")


class Hosts:
    def __init__(self, root: Path, hub: str, spokes: list[str], hub_names: tuple[str, ...] = ()) -> None:
        self.tag = secrets.token_hex(3)  # never the name of a namespace someone else made
        self.root, self.hub, self.spokes, self.hub_names = root, hub, spokes, hub_names
        self.namespace = {host: f"ft-{index}-{self.tag}" for index, host in enumerate([hub, *spokes])}
        self.created: list[str] = []  # only these are cleaned up
        self.logs: list = []

    def __enter__(self) -> Hosts:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        hub_ns = self.namespace[self.hub]
        for ns in self.namespace.values():
            self._step(["ip", "netns", "add", ns])
            self.created.append(ns)
        steps = [["ip", "-n", hub_ns, "link", "set", "lo", "up"]]
        for index, spoke in enumerate(self.spokes, start=1):
            ns, near, far = self.namespace[spoke], f"fth{index}-{self.tag}", f"fts{index}-{self.tag}"
            steps += [
                ["ip", "link", "add", near, "type", "veth", "peer", "name", far],
                ["ip", "link", "set", near, "netns", hub_ns],
                ["ip", "link", "set", far, "netns", ns],
                ["ip", "-n", hub_ns, "addr", "add", f"{self.hub_address(spoke)}/24", "dev", near],
                ["ip", "-n", ns, "addr", "add", f"10.232.{index}.2/24", "dev", far],
                ["ip", "-n", hub_ns, "link", "set", near, "up"],
                ["ip", "-n", ns, "link", "set", far, "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
            ]
        for step in steps:
            self._step(step)
        for spoke in self.spokes if self.hub_names else []:
            etc = NETNS_ETC / self.namespace[spoke]
            names = f"{self.hub_address(spoke)} {' '.join(self.hub_names)}\n"
            try:
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
            except OSError as err:
                pytest.skip(f"cannot give the namespaces host names here ({etc}: {err})")
        for host in self.namespace:
            self.home(host).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _step(step: list[str]) -> None:
        try:
            result = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as err:
            pytest.skip(f"network namespaces unavailable here ({err})")
        if result.returncode != 0:
            pytest.skip(f"network namespaces unavailable here ({' '.join(step)}: {result.stderr.strip()})")

    def __exit__(self, *exc: object) -> None:
        for ns in self.created:
            self.kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for log in self.logs:
            log.close()

    def hub_address(self, spoke: str) -> str:
        return f"10.232.{self.spokes.index(spoke) + 1}.1"

    def directory(self, host: str) -> Path:
        return self.root / host

    def home(self, host: str) -> Path:
        return self.directory(host) / "home"

    def command(self, host: str, *args: str) -> list[str]:
        """ARGS run on HOST's network (and the shared file system)."""
        return ["ip", "netns", "exec", self.namespace[host], *args]

    def shell(self, host: str, script: str, env: dict[str, str], log: Path) -> subprocess.Popen:
        """``bash -e`` running SCRIPT on HOST, in its directory, under its host name and home."""
        named = 'hostname "$1" && exec bash -ec "$2"'  # the machine's own host name, then SCRIPT
        command = self.command(host, "unshare", "--uts", "bash", "-c", named, "_", host, script)
        environment = {
            **os.environ,
            **env,
            "HOME": str(self.home(host)),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the installed `fedtune`
        }
        self.logs.append(open(log, "w"))
        return subprocess.Popen(
            command, cwd=self.directory(host), env=environment, stdout=self.logs[-1], stderr=subprocess.STDOUT
        )

    def processes(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespace[host]], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    @staticmethod
    def kill_all(ns: str) -> None:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
