"""Machines for deployment tests: network namespaces, each with its own directory, home and host name.

One hub (the coordinator's host) and spokes (agents' machines); each spoke reaches the
hub over its own veth pair, at the hub's address on that link, and resolves the hub's
host names through ``/etc/netns/SPOKE/hosts`` (``ip netns exec`` mounts it over
/etc/hosts). Only addresses inside these namespaces are used. Where namespaces cannot
be made (not root, no ``ip``), the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NETNS_ETC = Path("/etc/netns")


class Hosts:
    def __init__(self, root: Path, hub: str, spokes: list[str], hub_names: tuple[str, ...] = ()) -> None:
        tag = str(os.getpid() % 100000)
        self.root, self.hub, self.spokes, self.hub_names = root, hub, spokes, hub_names
        self.namespace = {host: f"ft-{index}-{tag}" for index, host in enumerate([hub, *spokes])}

    def __enter__(self) -> Hosts:
        hub_ns = self.namespace[self.hub]
        steps = [["ip", "netns", "add", ns] for ns in self.namespace.values()]
        steps.append(["ip", "-n", hub_ns, "link", "set", "lo", "up"])
        for index, spoke in enumerate(self.spokes, start=1):
            ns, near, far = self.namespace[spoke], f"fth{index}-{os.getpid() % 10000}", f"fts{index}-{os.getpid() % 10000}"
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
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                self.__exit__()
                pytest.skip(f"network namespaces unavailable here ({' '.join(step)}: {result.stderr.strip()})")
        for spoke in self.spokes:
            etc = NETNS_ETC / self.namespace[spoke]
            etc.mkdir(parents=True, exist_ok=True)
            names = f"{self.hub_address(spoke)} {' '.join(self.hub_names)}\n" if self.hub_names else ""
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{names}")
        for host in self.namespace:
            self.home(host).mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.namespace.values():
            self.kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)

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
        command = self.command(host, "unshare", "--uts", "bash", "-c", 'hostname "$1" && exec bash -ec "$2"', "_", host, script)
        environment = {
            **os.environ,
            **env,
            "HOME": str(self.home(host)),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the installed `fedtune`
        }
        return subprocess.Popen(
            command, cwd=self.directory(host), env=environment, stdout=open(log, "w"), stderr=subprocess.STDOUT
        )

    def processes(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespace[host]], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_all(self, ns: str) -> None:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
