"""The coordinator's public listener: only Fleet API replies from authenticated agents, bounded throughout.

Everyone who can open a TCP connection reaches this port. Flower's own HTTP app authenticates a
request only once its whole body has been read, serves every API on one port, and stores any
message a node pushes; uvicorn alone bounds neither the TLS handshake nor the time a request
head or body may take. So the listener, in order:

1. **Connection** (``GuardedConnection``): at most ``max_connections`` open connections and
   ``max_connections_per_peer`` per peer address; past either, a new connection is closed at
   accept, before any TLS work, so descriptors never run out. The TLS handshake must end in
   ``handshake_seconds`` (asyncio's own ``ssl_handshake_timeout``); a request head must be
   complete ``head_seconds`` after the connection opened or the previous response (its size
   is h11's own bound), an idle keep-alive connection closes after uvicorn's own timeout.
2. **Request head** (``FleetOnly``): the Fleet API routes only (404 otherwise); with agent
   keys, the head must carry a fresh timestamp signed by a *registered* key (Flower's own
   check, made before any body byte is read: 401; ``activate-node`` only needs the signature,
   so that Flower itself tells an unregistered agent its key is unknown); a body over its
   route's size (an object upload: ``max_request_bytes``; push-messages: its bounded tree;
   anything else: 64 KiB) gets 413; the body reserves its length in a budget of bytes in
   flight, per peer and in all (503 when full).
3. **Body**: it must arrive within ``body_seconds`` plus its length at ``min_body_rate``
   (408 otherwise).
4. **Message** (``push-messages``): ``coordinator/fleet_rules.py``'s ``push_problem`` (403):
   one reply, from the node that sent it, to the SuperLink, whose stored metadata is the one
   checked, with a bounded object tree. Forged instructions never reach Flower's store.

Accept errors and refusals are logged at most once per ``LOG_EVERY_SECONDS`` per kind, with a
count of the lines left out, so no peer can fill the disk with log lines.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import logging
import re
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedtune.coordinator.fleet_rules import push_problem
from fedtune.core.flower_internals import (
    ARRAY_CHUNK_BYTES,
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TIMESTAMP_TOLERANCE,
    PushMessagesRequest,
    PushObjectRequest,
    bytes_to_public_key,
    get_object_head_values_from_object_content,
    verify_signature,
)

FLEET_ROUTES = frozenset(
    f"/v1/fleet/{route}"
    for route in (
        "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
        "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
        "confirm-message-received",
    )
)  # fmt: skip
PUSH_MESSAGES, PUSH_OBJECT, ACTIVATE_NODE = (
    "/v1/fleet/push-messages",
    "/v1/fleet/push-object",
    "/v1/fleet/activate-node",
)
SMALL_BODY = 2**16  # every other Fleet request: a node id, a key, a heartbeat, object ids
TREE_NODE_BYTES = 80  # one object id (64 hex digits) and its protobuf framing in a push-messages tree
CLOCK_SKEW_SECONDS = 5.0  # Flower's SYSTEM_TIME_TOLERANCE
LOG_EVERY_SECONDS = 10.0
VARIABLE_PARTS = re.compile(r"\d+|\S{24,}")
TEMPLATE_CHARS, LINE_CHARS, MAX_TEMPLATES = 96, 300, 4096
MAX_REPLIES_REMEMBERED = 100_000  # (node, instruction) pairs the listener remembers replies to
log = logging.getLogger("flwr")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ListenerLimits:
    """What one peer, and all peers together, may hold of the public listener."""

    max_message_objects: int = 1024  # objects one pushed message may declare (federation.max_message_mb)
    max_request_bytes: int = ARRAY_CHUNK_BYTES + 2**20  # Flower moves arrays in chunks of ARRAY_CHUNK_BYTES
    max_in_flight_bytes: int = 160 * 2**20  # request bodies being received, all peers
    max_in_flight_bytes_per_peer: int = 64 * 2**20
    max_connections: int = 1024
    max_connections_per_peer: int = 128
    handshake_seconds: float = 10.0
    head_seconds: float = 10.0
    body_seconds: float = 10.0
    min_body_rate: float = 64 * 2**10  # bytes/s: a 5 MiB chunk may take 90 s on a slow link
    idle_seconds: int = 5  # keep-alive (uvicorn's timeout_keep_alive)


class RateLimitedLog(logging.Filter):
    """Lets one record per (logger, message template) through every LOG_EVERY_SECONDS, then says how
    many it held back."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[tuple[str, str], float] = {}
        self.held: Counter[tuple[str, str]] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        # Flower logs some errors already formatted, with fields of the request in them: the template is
        # the message with its numbers, ids and long tokens blanked, so each request is not a new kind
        key = (record.name, VARIABLE_PARTS.sub("#", str(record.msg))[:TEMPLATE_CHARS])
        if len(record.getMessage()) > LINE_CHARS:  # an attacker's field cannot make a line long
            record.msg, record.args = record.getMessage()[:LINE_CHARS] + " [...]", ()
        if len(self.last) > MAX_TEMPLATES:  # bounded memory, whatever the peers send
            self.last.clear()
            self.held.clear()
        now = time.monotonic()
        if now - self.last.get(key, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self.held[key] += 1
            return False
        self.last[key] = now
        if held := self.held.pop(key, 0):
            record.msg = f"{record.msg} ({held} similar lines in the last {LOG_EVERY_SECONDS:g} s left out)"
        return True


@dataclass
class Budget:
    """Counts held per peer and in all, each against its own limit."""

    per_peer_limit: int
    total_limit: int
    per_peer: Counter[str] = field(default_factory=Counter)
    total: int = 0

    def take(self, peer: str, amount: int = 1) -> bool:
        if self.total + amount > self.total_limit or self.per_peer[peer] + amount > self.per_peer_limit:
            return False
        self.total += amount
        self.per_peer[peer] += amount
        return True

    def give_back(self, peer: str, amount: int = 1) -> None:
        self.total -= amount
        self.per_peer[peer] -= amount
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]


class Connections:
    """The open connections: at most ``max_connections_per_peer`` per address and ``max_connections`` in all.
    When all are taken, the oldest connection that has not yet made a signed request makes room: a flood of
    connections that never authenticate cannot lock out an agent (which signs its first request)."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.per_peer: Counter[str] = Counter()
        self.open: OrderedDict[tuple[str, int], GuardedConnection] = OrderedDict()  # oldest first
        self.signed: set[tuple[str, int]] = set()

    def admit(self, address: tuple[str, int], connection: GuardedConnection) -> bool:
        if self.per_peer[address[0]] >= self.limits.max_connections_per_peer:
            return False
        if len(self.open) >= self.limits.max_connections:
            unsigned = next((a for a in self.open if a not in self.signed), None)
            if unsigned is None:
                return False
            victim = self.open[unsigned]
            self.release(unsigned)
            victim.close()
        self.open[address] = connection
        self.per_peer[address[0]] += 1
        return True

    def release(self, address: tuple[str, int]) -> None:
        if self.open.pop(address, None) is not None:
            self.signed.discard(address)
            self.per_peer[address[0]] -= 1
            if self.per_peer[address[0]] <= 0:
                del self.per_peer[address[0]]

    def mark_signed(self, address: tuple[str, int]) -> None:
        if address in self.open:
            self.signed.add(address)


class GuardedConnection(asyncio.Protocol):
    """One accepted connection: admitted (or closed at once), then TLS within its deadline, then
    uvicorn's h11 protocol, whose every request head must arrive within ``head_seconds``."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ListenerLimits,
        connections: Connections,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.limits, self.connections, self.tls = limits, connections, tls
        self.http = H11Protocol(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        self.address: tuple[str, int] | None = None  # the peer's (host, port), once admitted
        self.transport: asyncio.BaseTransport | None = None
        self.serving = False
        self.early = bytearray()  # decrypted bytes that arrive before the h11 protocol is connected
        self.cycle: object = None  # the h11 request cycle last seen: a new one means a complete head
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        address = (str(peername[0]), int(peername[1])) if peername else ("unknown", id(self))
        self.transport = transport
        if not self.connections.admit(address, self):
            transport.abort()  # before any TLS work: a refused connection costs a descriptor for an instant
            return
        self.address = address
        if self.tls is None:
            self._serve(transport)
            return
        transport.pause_reading()  # the ClientHello waits for start_tls
        asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                transport, self, self.tls, server_side=True, ssl_handshake_timeout=self.limits.handshake_seconds
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError, RuntimeError):
            transport.abort()
            self._release()
            return
        if secure is None:  # the peer went away during the handshake
            self._release()
            return
        self._serve(secure)

    def _serve(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.serving = transport, True
        self.http.connection_made(transport)
        self._arm()
        if self.early:  # what came with the end of the handshake, before start_tls returned
            early, self.early = bytes(self.early), bytearray()
            self.data_received(early)

    def _arm(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.limits.head_seconds, self._head_overdue)

    def _head_overdue(self) -> None:
        self.timer = None
        self.close()

    def close(self) -> None:
        """Drop the connection now (a head that never came, or room for another)."""
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.serving:
            self.early += data
            return
        self.http.data_received(data)
        cycle = self.http.cycle
        if cycle is not self.cycle:  # a complete request head: the body has deadlines of its own (FleetOnly)
            self.cycle = cycle
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        elif cycle is None or cycle.response_complete:  # bytes of the next head
            self._arm()

    def eof_received(self) -> bool | None:
        return self.http.eof_received() if self.serving else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.serving:
            self.serving = False
            self.http.connection_lost(exc)
        self._release()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def _release(self) -> None:
        if self.address is not None:
            self.connections.release(self.address)
            self.address = None


class FleetOnly:
    """ASGI wrapper of Flower's app for the public listener: steps 2 to 4 of the module docstring."""

    def __init__(self, app: Any, limits: ListenerLimits, connections: Connections) -> None:
        self.app, self.limits, self.connections = app, limits, connections
        self.in_flight = Budget(limits.max_in_flight_bytes_per_peer, limits.max_in_flight_bytes)
        self.replies: OrderedDict[tuple[int, str], str] = OrderedDict()  # (node, instruction) -> its reply, hashed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] not in FLEET_ROUTES:
            await _reply(send, 404, b"only the Fleet API is served on this address")
            return
        headers = dict(scope.get("headers", []))
        client = scope.get("client") or ("unknown", 0)
        holder = str(client[0])  # who the bytes in flight are counted against: the peer, or its key
        if self._auth_required():
            signed, registered = await run_in_threadpool(self._signer, headers)
            if not signed or not (registered or scope["path"] == ACTIVATE_NODE):  # Flower refuses an unknown key
                await _reply(send, 401, b"not signed by a registered key")
                return
            self.connections.mark_signed((str(client[0]), int(client[1])))
            holder = headers[FLEET_HTTP_PUBLIC_KEY_HEADER.encode()].decode("ascii", "replace") if registered else holder
        largest = self._largest_body(scope["path"])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > largest):
            await _reply(send, 413, b"request body too large")
            return
        size = int(declared) if declared is not None else largest
        peer = str(client[0])
        if not self.in_flight.take(holder, size):
            await _reply(send, 503, b"busy: too many request bytes in flight")
            return
        try:  # the reservation holds until Flower has handled the request (it copies the body once more)
            body = await self._body(receive, size, send)
            if body is None:
                return
            problem = self._push_problem(body) if scope["path"] == PUSH_MESSAGES else None
            problem = problem or (self._object_problem(body) if scope["path"] == PUSH_OBJECT else None)
            if problem:
                log.warning("[fedtune] refused a %s request from %s: %s", scope["path"].rsplit("/", 1)[-1], peer, problem)
                await _reply(send, 403, problem.encode())
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight.give_back(holder, size)

    async def _body(self, receive: Receive, size: int, send: Send) -> bytes | None:
        """The request body, or None once answered (too large, too slow, or the peer went away)."""
        deadline = time.monotonic() + self.limits.body_seconds + size / self.limits.min_body_rate
        body = bytearray()
        while True:
            try:
                event = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await _reply(send, 408, b"request body too slow")
                return None
            if event["type"] == "http.disconnect":
                return None
            body += event.get("body", b"")
            if len(body) > size:
                await _reply(send, 413, b"request body too large")
                return None
            if not event.get("more_body", False):
                return bytes(body)

    def _auth_required(self) -> bool:
        return bool(getattr(self.app.state, "enable_supernode_auth", False))

    def _largest_body(self, path: str) -> int:
        """Only object uploads carry arrays; a push-messages carries a bounded tree; the rest are small."""
        if path == PUSH_OBJECT:
            return self.limits.max_request_bytes
        if path == PUSH_MESSAGES:
            return SMALL_BODY + TREE_NODE_BYTES * self.limits.max_message_objects
        return SMALL_BODY

    def _signer(self, headers: dict[bytes, bytes]) -> tuple[bool, bool]:
        """(signed, registered): Flower's node check on the head alone, a timestamp within its window signed
        by the key the head names, and whether the coordinator registered that key (the body's node id is
        Flower's to match against the key, later)."""
        try:
            public_key = base64.b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER.encode()], validate=True)
            signature = base64.b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER.encode()], validate=True)
            timestamp = headers[TIMESTAMP_HEADER.encode()].decode("ascii")
            signed_at = datetime.datetime.fromisoformat(timestamp)
            age = (datetime.datetime.now(datetime.timezone.utc) - signed_at).total_seconds()
            if not -CLOCK_SKEW_SECONDS < age < TIMESTAMP_TOLERANCE + CLOCK_SKEW_SECONDS:
                return False, False
            if not verify_signature(bytes_to_public_key(public_key), timestamp.encode("ascii"), signature):
                return False, False
        except (KeyError, ValueError, TypeError, UnicodeError, binascii.Error):
            return False, False
        return True, self.app.state.linkstate_factory.state().get_node_id_by_public_key(public_key) is not None

    def _push_problem(self, body: bytes) -> str | None:
        """``push_problem``, and one reply per instruction: Flower takes a repeated message id as a retry and
        registers the tree it now declares, so a node could store new objects under one reply again and again
        (a retry of the identical message and tree still passes)."""
        request = PushMessagesRequest()
        try:
            request.ParseFromString(body)
        except Exception:  # protobuf's DecodeError, or a message nested past its recursion limit
            return "not a push-messages request"
        if problem := push_problem(request, self.limits.max_message_objects):
            return problem
        metadata, tree = request.messages_list[0].metadata, request.message_object_trees[0]
        key = (metadata.src_node_id, metadata.reply_to_message_id)
        declared = hashlib.sha256(metadata.message_id.encode() + tree.SerializeToString(deterministic=True)).hexdigest()
        if self.replies.setdefault(key, declared) != declared:
            return "a second reply to one instruction"
        while len(self.replies) > MAX_REPLIES_REMEMBERED:
            self.replies.popitem(last=False)
        return None

    def _object_problem(self, body: bytes) -> str | None:
        """An uploaded object must name the children its tree registered (the store keeps that list)."""
        request = PushObjectRequest()
        try:
            request.ParseFromString(body)
            _, children, _ = get_object_head_values_from_object_content(request.object_content)
        except Exception:  # not protobuf, no header: Flower's own checks answer it
            return None
        try:
            registered = self.app.state.linkstate_factory.state().object_store.get_object_tree(request.object_id)
        except Exception:  # not registered: Flower refuses it
            return None
        if children != [child.object_id for child in registered.children]:
            return "the object names other children than its tree registered"
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that hands the already-read BODY to the app, then the connection's events."""
    delivered = False

    async def replay() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reply(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})
