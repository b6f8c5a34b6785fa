"""Collecting replies: one per instruction, each checked on its own, bounded, within the round's deadline.

Flower's ``Grid.pull_messages`` returns whatever the SuperLink holds for the ServerApp (replies,
but also any instruction addressed to the SuperLink itself), pulls every object a reply's tree
names, then inflates them all in one loop, so a single malformed reply raises out of the pull
and ends the run. Here each reply is handled alone (coordinator/fleet_rules.py):

1. it must answer one of this collection's instructions, from the node the instruction went
   to, with the instruction's type; anything else is ignored, a second reply never counts;
2. its object tree must fit the plan's bound on objects, and its objects the plan's bound on
   bytes, counted while they arrive (a reply that declares more is refused before it is read);
3. its objects must form exactly that tree, then it is inflated, and its inflated metadata
   must equal the metadata that was checked.

A reply that fails a step is handed on as an error reply of the node it came from (a fixed
fault code, ``fedtune.core.faults``), so the strategy rejects it like any failed reply and the
round goes on. Each pull also waits at most until the collection's deadline: a reply
registered but never uploaded (Flower alone would wait out its 180 s upload session) comes
back as "message unavailable" at the deadline.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING

from flwr.app import Error, Message, Metadata
from flwr.serverapp import Grid

from fedtune.coordinator.fleet_rules import (
    Instruction,
    array_bytes,
    contents_problem,
    reply_problem,
    tree_problem,
    walk,
)
from fedtune.core import faults
from fedtune.core.flower_internals import (
    ARRAY_CHUNK_BYTES,
    SUPERLINK_NODE_ID,
    ConfirmMessageReceivedRequest,
    ObjectPullError,
    ObjectTree,
    ProtoMessage,
    PullAppMessagesRequest,
    grid_runtime,
    inflate_object_from_contents,
    is_http_grid,
    log,
    make_message,
    make_pull_object_fn_protobuf,
    pull_objects,
)
from fedtune.core.processes import yield_to_clients

REPLY_POLL_SECONDS = 0.2
MIN_PULL_SECONDS = 1.0  # a reply that is being uploaded at the deadline still gets this long
TTL_MARGIN_SECONDS = 30.0  # an instruction outlives its collection's deadline by this much (clock skew, uploads)
OBJECTS_BESIDE_CHUNKS = 32  # a reply's Message, RecordDict, records and arrays; chunks come on top


@dataclass(frozen=True)
class ReplyBudget:
    """The most a reply may weigh (all its objects' bytes), from the strategy's plan."""

    max_bytes: int

    @property
    def max_objects(self) -> int:
        """Object references a reply of MAX_BYTES can need: its records and arrays, and chunks of at
        most Flower's chunk size each (a chunk named twice counts twice)."""
        return OBJECTS_BESIDE_CHUNKS + 2 * math.ceil(self.max_bytes / ARRAY_CHUNK_BYTES)


def send(grid: Grid, messages: Iterable[Message], deadline: float) -> dict[str, Instruction]:
    """Push MESSAGES, each living until DEADLINE (then the SuperLink drops it, and refuses a late reply
    to it); the instructions now awaiting a reply, by message id."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = max(MIN_PULL_SECONDS, deadline - time.time()) + TTL_MARGIN_SECONDS
    ids = grid.push_messages(messages)
    return {
        message_id: Instruction(message.metadata.dst_node_id, message.metadata.message_type)
        for message_id, message in zip(ids, messages)
        if message_id
    }


def collect(
    grid: Grid,
    instructions: Mapping[str, Instruction],
    deadline: float,
    budget: ReplyBudget,
    on_reply: Callable[[Message], None],
) -> set[int]:
    """Pull replies until every instruction has one or DEADLINE (time.time()) passes, handing each
    checked reply (or the error reply it earned) to ON_REPLY as it arrives; return the nodes that
    did not answer."""
    fetch = _checked_fetch(grid) if is_http_grid(grid) else _in_process_fetch(grid)
    pending = dict(instructions)
    while pending:
        past_deadline = time.time() >= deadline  # checked before the pull: one more pull after it
        for announced, receive in fetch(list(pending)):
            reply_to = announced.metadata.reply_to_message_id
            instruction = pending.get(reply_to)
            problem = "it answers no open instruction" if instruction is None else None
            problem = problem or reply_problem(announced, instruction, grid.run.run_id)
            if problem:
                log(WARNING, "ignored a message from node %d: %s", announced.metadata.src_node_id, problem)
                continue
            del pending[reply_to]
            on_reply(receive(instruction, budget, deadline))
        if not pending or past_deadline:
            break
        yield_to_clients()  # in a simulation, Flower's message polling shares this process (and the cores)
        time.sleep(REPLY_POLL_SECONDS)
    return {instruction.node_id for instruction in pending.values()}


Receive = Callable[[Instruction, ReplyBudget, float], Message]
Fetch = Callable[[list[str]], Iterable[tuple[ProtoMessage | Message, Receive]]]


def _checked_fetch(grid: Grid) -> Fetch:
    """Deployment (Flower's HttpGrid, the Runtime API): the replies announced for IDS, each with the
    function that pulls, checks and inflates it, only once its announcement has been checked."""
    runtime, node, run_id = grid_runtime(grid)

    def fetch(ids: list[str]) -> Iterable[tuple[ProtoMessage, Receive]]:
        response = runtime.PullMessages(PullAppMessagesRequest(message_ids=ids))
        for proto, tree in zip(response.messages_list, response.message_object_trees):
            yield proto, functools.partial(_receive, runtime, node, run_id, proto, tree)

    return fetch


def _in_process_fetch(grid: Grid) -> Fetch:
    """A simulation (Flower's in-memory Grid): replies arrive as Message objects from the run's own
    ClientApps in this machine's Ray workers; the same one-reply-per-instruction rules apply."""

    def fetch(ids: list[str]) -> Iterable[tuple[Message, Receive]]:
        for message in grid.pull_messages(ids):
            yield message, lambda instruction, budget, deadline, message=message: message

    return fetch


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send MESSAGES and collect their replies for TIMEOUT seconds (small replies only: notices)."""
    replies: list[Message] = []
    deadline = time.time() + timeout
    collect(grid, send(grid, messages, deadline), deadline, ReplyBudget(2**16), replies.append)
    return replies


def _receive(
    runtime: object,
    node: object,
    run_id: int,
    proto: ProtoMessage,
    tree: ObjectTree,
    instruction: Instruction,
    budget: ReplyBudget,
    deadline: float,
) -> Message:
    """The reply PROTO announced, pulled, checked and inflated, or the error reply of the check it failed."""
    message_id = proto.metadata.message_id
    if problem := tree_problem(tree, budget.max_objects):
        return _rejected(proto, instruction, faults.OVERSIZED, problem)
    pull = _bounded(make_pull_object_fn_protobuf(runtime.PullObject, node, run_id), budget.max_bytes)
    ids = list(dict.fromkeys(child.object_id for child, _ in walk(tree)))
    try:
        contents = pull_objects(ids, pull, max_time=max(MIN_PULL_SECONDS, deadline - time.time()))
    except ObjectPullError as err:
        code = faults.OVERSIZED if pull.exceeded.is_set() else faults.MESSAGE_UNAVAILABLE
        return _rejected(proto, instruction, code, str(err))
    finally:
        runtime.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=message_id)
        )
    if problem := contents_problem(tree, contents):
        return _rejected(proto, instruction, faults.MALFORMED, problem)
    if (declared := array_bytes(tree, contents)) > budget.max_bytes:
        return _rejected(proto, instruction, faults.OVERSIZED, f"its arrays would hold {declared} bytes")
    try:
        message = inflate_object_from_contents(message_id, contents)
    except Exception as err:  # anything a crafted object can make Flower's inflation raise
        return _rejected(proto, instruction, faults.MALFORMED, type(err).__name__)
    if not isinstance(message, Message) or not _same_metadata(message.metadata, proto):
        return _rejected(proto, instruction, faults.MALFORMED, "its stored metadata is not the one checked")
    message.metadata.__dict__["_message_id"] = message_id
    return message


class _bounded:
    """A pull-object function that stops once the objects pulled so far exceed MAX_BYTES."""

    def __init__(self, pull: Callable[[str], bytes], max_bytes: int) -> None:
        self.pull, self.max_bytes, self.received = pull, max_bytes, 0
        self.lock, self.exceeded = threading.Lock(), threading.Event()

    def __call__(self, object_id: str) -> bytes:
        content = self.pull(object_id)
        with self.lock:
            self.received += len(content)
            if self.received > self.max_bytes:
                self.exceeded.set()
                raise ObjectPullError(object_id, f"the reply is larger than the plan's {self.max_bytes} bytes")
        return content


def _same_metadata(inflated: Metadata, proto: ProtoMessage) -> bool:
    checked = proto.metadata
    return (
        inflated.run_id == checked.run_id
        and inflated.src_node_id == checked.src_node_id
        and inflated.dst_node_id == checked.dst_node_id
        and inflated.reply_to_message_id == checked.reply_to_message_id
        and inflated.message_type == checked.message_type
    )


def _rejected(proto: ProtoMessage, instruction: Instruction, code: int, detail: str) -> Message:
    """An error reply in the name of the node INSTRUCTION went to (only the code reaches the records)."""
    log(WARNING, "reply from node %d refused: %s (%s)", instruction.node_id, faults.describe(code), detail)
    metadata = Metadata(
        run_id=proto.metadata.run_id,
        message_id="",
        src_node_id=instruction.node_id,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=proto.metadata.reply_to_message_id,
        group_id="",
        created_at=time.time(),
        ttl=0,
        message_type=instruction.message_type,
    )
    return make_message(metadata=metadata, error=Error(code=code, reason=faults.describe(code)))
