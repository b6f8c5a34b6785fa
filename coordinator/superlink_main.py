"""Flower's ``flower-superlink`` for a deployed coordinator: only the Fleet API faces the network.

Flower 1.41 serves its Fleet, Control and Runtime (ServerApp) APIs from one HTTP app on
one ``--host/--port`` (its ``--fleet-api-address``/``--control-api-address`` are
deprecated no-ops). Whoever reaches that port (every agent holds the CA) could then use
Flower's own CLI to list runs, register keys and submit apps. Here the same, unchanged
Flower app is served twice from one process:

- on ``--host/--port`` (loopback): every API, for the coordinator's own ``flwr`` CLI,
  superexec and ServerApp;
- on ``--public-address``: the Fleet API routes (``/v1/fleet/*``) alone, with request
  bodies capped at ``--max-request-bytes`` (a message the plan cannot need is refused
  with 413 before Flower stores it).

The SuperLink also starts fedtune's superexec (coordinator/superexec_main.py), which runs
fedtune's own app only. Otherwise it is Flower's SuperLink.

    python -m fedtune.coordinator.superlink_main --public-address HOST:PORT --max-request-bytes N <flower-superlink args>
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

flower = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module; the package exports a function

FLEET_PREFIX = "/v1/fleet/"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class FleetOnly:
    """ASGI wrapper: Fleet API requests up to ``max_body`` bytes pass; everything else is refused."""

    def __init__(self, app: Callable, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if not scope["path"].startswith(FLEET_PREFIX):
            await _reply(send, 404, b"only the Fleet API is served on this address")
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _reply(send, 413, b"request body too large")
            return
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            body += event.get("body", b"")
            if len(body) > self.max_body:
                await _reply(send, 413, b"request body too large")
                return
            if not event.get("more_body", False):
                break
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})


class _Server(uvicorn.Server):
    """A uvicorn server that stops its peers too (each installs the same signal handlers)."""

    peers: list[uvicorn.Server]

    def handle_exit(self, sig: int, frame: Any) -> None:
        for server in self.peers:
            uvicorn.Server.handle_exit(server, sig, frame)


def serve_split(public_host: str, public_port: int, max_body: int) -> Callable:
    """A replacement for Flower's ``_run_superlink_http_api`` serving two listeners."""

    def run(lifespan_config: Any) -> None:
        from flwr.superlink.main import create_app

        app = create_app(lifespan_config, flower.SuperLinkLifespan)
        common = {
            "ssl_keyfile": lifespan_config.ssl_keyfile,
            "ssl_certfile": lifespan_config.ssl_certfile,
            "log_config": flower.get_uvicorn_log_config(flower.console_handler.level),
            "workers": 1,
        }
        inner = _Server(uvicorn.Config(app, host=lifespan_config.host, port=lifespan_config.port, **common))
        outer = _Server(
            uvicorn.Config(FleetOnly(app, max_body), host=public_host, port=public_port, lifespan="off", **common)
        )
        inner.peers = outer.peers = [inner, outer]

        async def both() -> None:
            await asyncio.gather(inner.serve(), outer.serve())

        asyncio.run(both())

    return run


def superexec_command(*args: Any, **kwargs: Any) -> list[str]:
    """Flower's superexec command line, with fedtune's superexec in place of ``flower-superexec``."""
    command = ORIGINAL_SUPEREXEC_COMMAND(*args, **kwargs)
    return [sys.executable, "-m", "fedtune.coordinator.superexec_main", *command[1:]]


ORIGINAL_SUPEREXEC_COMMAND = flower._get_superexec_command


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--public-address", required=True)
    parser.add_argument("--max-request-bytes", type=int, required=True)
    ours, flower_args = parser.parse_known_args()
    host, _, port = ours.public_address.rpartition(":")
    flower._run_superlink_http_api = serve_split(host.strip("[]"), int(port), ours.max_request_bytes)
    flower._get_superexec_command = superexec_command
    sys.argv = ["flower-superlink", *flower_args]
    flower.flower_superlink()


if __name__ == "__main__":
    main()
