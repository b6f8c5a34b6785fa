"""Flower's ``flower-superlink`` for a deployed coordinator: only the Fleet API faces the network.

Flower serves its Fleet, Control and Runtime (ServerApp) APIs from one HTTP app on one
``--host/--port``. Whoever reaches that port (every agent holds the CA) could then use
Flower's own CLI to list runs, register keys and submit apps. Here the same, unchanged
Flower app is served twice from one process:

- on ``--host/--port`` (loopback): every API, for the coordinator's own ``flwr`` CLI,
  superexec and ServerApp;
- on ``--public-address``: the Fleet API alone, behind coordinator/fleet_guard.py (bounded
  connections, handshakes, heads and bodies; heads signed by a registered key before any
  body byte is read; replies only, whose stored metadata is the one checked), with request
  bodies capped at ``--max-request-bytes`` and a pushed message's objects at what
  ``--max-message-bytes`` can need.

The SuperLink also starts fedtune's superexec (coordinator/superexec_main.py), which runs
fedtune's own app only. Otherwise it is Flower's SuperLink.

    python -m fedtune.coordinator.superlink_main --public-address HOST:PORT --max-request-bytes N \
        --max-message-bytes M <flower-superlink args>
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import dataclasses
import functools
import logging
import resource
import ssl
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from fedtune.coordinator.fleet_guard import Connections, FleetOnly, GuardedConnection, ListenerLimits, RateLimitedLog
from fedtune.coordinator.replies import ReplyBudget
from fedtune.core import flower_internals

flower = flower_internals.superlink_cli  # the module; the package exports a function
DESCRIPTORS_BESIDE_CONNECTIONS = 256  # the SuperLink's own files, loopback APIs and subprocess pipes
TLS_READ_BUFFER = 16 * 2**10  # bytes per TLS connection (the largest TLS record)

class _Server(uvicorn.Server):
    """A uvicorn server that stops its peers too (each installs the same signal handlers)."""

    peers: list[uvicorn.Server]

    def handle_exit(self, sig: int, frame: Any) -> None:
        for server in self.peers:
            uvicorn.Server.handle_exit(server, sig, frame)


def serve_split(public_host: str, public_port: int, limits: ListenerLimits) -> Callable:
    """A replacement for Flower's ``_run_superlink_http_api`` serving two listeners."""

    def run(lifespan_config: Any) -> None:
        app = flower_internals.superlink_app.create_app(lifespan_config, flower.SuperLinkLifespan)
        log_config = flower.get_uvicorn_log_config(flower.console_handler.level)
        inner = _Server(
            uvicorn.Config(
                app,
                host=lifespan_config.host,
                port=lifespan_config.port,
                ssl_keyfile=lifespan_config.ssl_keyfile,
                ssl_certfile=lifespan_config.ssl_certfile,
                log_config=log_config,
                workers=1,
            )
        )
        tls = _server_tls(lifespan_config.ssl_certfile, lifespan_config.ssl_keyfile)
        connections = Connections(limits)
        guarded = functools.partial(GuardedConnection, limits=limits, connections=connections, tls=tls)
        outer = _Server(
            uvicorn.Config(
                FleetOnly(app, limits, connections),
                host=public_host,
                port=public_port,
                lifespan="off",
                http=guarded,  # TLS is done by the guarded connection, with its handshake deadline
                timeout_keep_alive=limits.idle_seconds,
                log_config=log_config,
                workers=1,
            )
        )
        inner.peers = outer.peers = [inner, outer]

        async def both() -> None:
            asyncio.get_running_loop().set_exception_handler(_rate_limited_loop_errors())
            await asyncio.gather(inner.serve(), outer.serve())

        asyncio.run(both())

    return run


def _server_tls(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """The public listener's TLS context, from the SuperLink's own certificate (none with --insecure)."""
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def _rate_limited_loop_errors() -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """asyncio's error reports (accept errors among them), at most one line per kind every few seconds."""
    limiter = RateLimitedLog()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        record = logging.LogRecord("asyncio", logging.ERROR, __file__, 0, context.get("message", "error"), (), None)
        if limiter.filter(record):
            exception = context.get("exception")
            kind = f" ({type(exception).__name__})" if exception else ""
            logging.getLogger("asyncio").error("%s%s", record.msg, kind)

    return handle


def raise_descriptor_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards WANTED (never above the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def superexec_command(*args: Any, **kwargs: Any) -> list[str]:
    """Flower's superexec command line, with fedtune's superexec in place of ``flower-superexec``."""
    command = ORIGINAL_SUPEREXEC_COMMAND(*args, **kwargs)
    return [sys.executable, "-m", "fedtune.coordinator.superexec_main", *command[1:]]


ORIGINAL_SUPEREXEC_COMMAND = flower._get_superexec_command


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--public-address", required=True)
    parser.add_argument("--max-request-bytes", type=int, required=True)
    parser.add_argument("--max-message-bytes", type=int, required=True)
    ours, flower_args = parser.parse_known_args()
    host, _, port = ours.public_address.rpartition(":")
    defaults = ListenerLimits()
    descriptors = raise_descriptor_limit(defaults.max_connections + DESCRIPTORS_BESIDE_CONNECTIONS)
    limits = dataclasses.replace(
        defaults,
        max_request_bytes=ours.max_request_bytes,
        max_message_objects=ReplyBudget(ours.max_message_bytes).max_objects,
        max_connections=min(defaults.max_connections, descriptors - DESCRIPTORS_BESIDE_CONNECTIONS),
    )
    for name in ("asyncio", "uvicorn.error", "uvicorn.access", "flwr"):
        logging.getLogger(name).addFilter(RateLimitedLog())
    # asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB, zero-filled,
    # so resident): 500 idle connections held 128 MiB. One TLS record (16 KiB) at a time is enough.
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    flower._run_superlink_http_api = serve_split(host.strip("[]"), int(port), limits)
    flower._get_superexec_command = superexec_command
    sys.argv = ["flower-superlink", *flower_args]
    flower.flower_superlink()


if __name__ == "__main__":
    main()
