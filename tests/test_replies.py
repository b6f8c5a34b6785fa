"""Collecting replies (coordinator/replies.py) and the listener's rules (coordinator/fleet_rules.py).

A real ``HttpGrid`` over a fake Runtime API that serves Flower's own objects: one reply per
instruction, each reply pulled, checked and inflated on its own, no message able to raise
out of a collection, and a stalled upload given up at the deadline. Property tests mutate a
well-formed reply every way the wire allows (hypothesis), as a hostile agent would.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from fleet_attacker import repeated_chunk_array
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import ObjectTree, PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.coordinator.fleet_rules import Instruction, push_problem
from fedtune.coordinator.replies import ReplyBudget, collect
from fedtune.core import faults
from flower_helpers import enter_run

RUN, AGENT, OTHER = 7, 1001, 1002
CREATED = 1.8e9  # a fixed creation time: hypothesis replays byte-identical messages


class FakeRuntime:
    """The three Runtime API calls a collection makes, over a dict of deflated objects."""

    def __init__(self) -> None:
        self.announced: list[tuple[object, ObjectTree]] = []
        self.objects: dict[str, bytes] = {}
        self.unavailable: set[str] = set()
        self.confirmed: list[str] = []

    def announce(self, proto, tree: ObjectTree, objects: dict[str, bytes]) -> None:
        self.announced.append((proto, tree))
        self.objects.update(objects)

    def PullMessages(self, request):  # noqa: N802 (Flower's name)
        wanted = set(request.message_ids)
        ready = [(p, t) for p, t in self.announced if p.metadata.reply_to_message_id in wanted]
        self.announced = [(p, t) for p, t in self.announced if (p, t) not in ready]
        return PullAppMessagesResponse(messages_list=[p for p, _ in ready], message_object_trees=[t for _, t in ready])

    def PullObject(self, request):  # noqa: N802
        if request.object_id in self.unavailable:
            return PullObjectResponse(object_found=True, object_available=False)
        content = self.objects.get(request.object_id)
        return PullObjectResponse(
            object_found=content is not None, object_available=True, object_content=content or b""
        )

    def ConfirmMessageReceived(self, request):  # noqa: N802
        self.confirmed.append(request.message_object_id)


def fake_grid() -> tuple[HttpGrid, FakeRuntime]:
    grid, runtime = HttpGrid(token="test"), FakeRuntime()
    grid._client = runtime  # what HttpGrid's Runtime API client would be
    grid.set_run(Run.create_empty(RUN))
    return grid, runtime


def instruction(dst: int = AGENT, kind: str = MessageType.TRAIN) -> Message:
    enter_run()
    message = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=dst, message_type=kind)
    message.metadata.__dict__.update(_run_id=RUN, _created_at=CREATED, _ttl=3600.0)  # the same bytes every time
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def reply_to(to: Message, values: int = 16) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"values": Array(np.arange(values, dtype=np.float32))}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    message = Message(content, reply_to=to)
    message.metadata.__dict__.update(_created_at=CREATED + 1, _ttl=60.0)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def wire_form(message: Message) -> tuple[object, ObjectTree, dict[str, bytes]]:
    """What an agent pushes: the proto without content, the object tree, the deflated objects."""
    proto = message_to_proto(remove_content_from_message(message))
    proto.metadata.message_id = message.object_id
    objects = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    return proto, get_object_tree(message), objects


def collected(grid: HttpGrid, pending: dict[str, Instruction], timeout: float = 2.0, budget: int = 2**16):
    replies: list[Message] = []
    missing = collect(grid, pending, time.time() + timeout, ReplyBudget(budget), replies.append)
    return replies, missing


def test_one_reply_per_instruction_from_the_node_it_went_to():
    grid, runtime = fake_grid()
    sent = instruction()
    honest = reply_to(sent)
    runtime.announce(*wire_form(honest))
    runtime.announce(*wire_form(reply_to(sent, values=8)))  # a second reply to the same instruction
    stranger = reply_to(instruction(dst=OTHER))  # answers an instruction of no collection
    runtime.announce(*wire_form(stranger))
    replies, missing = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)})
    assert [r.metadata.message_id for r in replies] == [honest.metadata.message_id] and missing == set()
    assert np.array_equal(replies[0].content["arrays"]["values"].numpy(), np.arange(16, dtype=np.float32))


def test_a_reply_from_another_node_than_the_instruction_s_is_ignored():
    grid, runtime = fake_grid()
    sent = instruction()
    proto, tree, objects = wire_form(reply_to(sent))
    proto.metadata.src_node_id = OTHER
    runtime.announce(proto, tree, objects)
    replies, missing = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)}, timeout=0.5)
    assert replies == [] and missing == {AGENT}


def test_a_never_uploaded_reply_gives_up_at_the_round_deadline():
    grid, runtime = fake_grid()
    sent = instruction()
    proto, tree, objects = wire_form(reply_to(sent))
    runtime.announce(proto, tree, objects)
    runtime.unavailable = set(objects)
    started = time.monotonic()
    replies, _ = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)}, timeout=2.0)
    assert time.monotonic() - started < 10.0  # Flower alone would retry for the SuperLink's 180 s push session
    assert [r.error.code for r in replies] == [faults.MESSAGE_UNAVAILABLE]
    assert replies[0].metadata.src_node_id == AGENT  # rejected in its sender's name, the round goes on


def test_a_reply_larger_than_the_budget_is_refused_while_it_arrives():
    grid, runtime = fake_grid()
    sent = instruction()
    runtime.announce(*wire_form(reply_to(sent, values=2**16)))  # 256 KiB against a 64 KiB budget
    replies, _ = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)})
    assert [r.error.code for r in replies] == [faults.OVERSIZED]


# -- a hostile agent's reply, mutated at the object level -----------------------------------------


def _mutated(data: st.DataObject, tree: ObjectTree, objects: dict[str, bytes]) -> tuple[str, ObjectTree, dict]:
    """The tree and objects of a reply, changed in one drawn way (or not at all), and which way."""
    how = data.draw(st.sampled_from(["none", "drop-child", "orphan", "extra-child", "bytes", "header", "repeat"]))
    objects = dict(objects)
    tree = ObjectTree.FromString(tree.SerializeToString())
    nodes = [tree]
    for node in nodes:
        nodes.extend(node.children)
    target = data.draw(st.sampled_from(nodes))
    if how == "drop-child" and target.children:
        del target.children[data.draw(st.integers(0, len(target.children) - 1))]
    elif how == "orphan":
        del tree.children[:]
    elif how == "extra-child":  # a copy: protobuf cannot copy a node into its own subtree
        target.children.append(ObjectTree.FromString(data.draw(st.sampled_from(nodes)).SerializeToString()))
    elif how == "bytes":
        key = data.draw(st.sampled_from(sorted(objects)))
        content = bytearray(objects[key])
        position = data.draw(st.integers(0, len(content) - 1))
        content[position] ^= data.draw(st.integers(1, 255))
        objects[key] = bytes(content)
    elif how == "header":
        key = data.draw(st.sampled_from(sorted(objects)))
        objects[key] = data.draw(st.binary(max_size=200))
    elif how == "repeat" and target.children:  # one child named many times (a chunk repeated)
        target.children.extend([target.children[0]] * data.draw(st.integers(1, 500)))
    return how, tree, objects


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_mutated_reply_raises_out_of_a_collection(data):
    """Issue 31, findings 4 and 6: a reply whose objects do not form its tree raised KeyError out of
    Flower's pull (the run ended); one declaring huge arrays was inflated first."""
    grid, runtime = fake_grid()
    sent = instruction()
    honest = reply_to(sent, values=data.draw(st.integers(1, 4096)))
    proto, tree, objects = wire_form(honest)
    how, tree, objects = _mutated(data, tree, objects)
    runtime.announce(proto, tree, objects)
    replies, _ = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)}, timeout=0.3)
    assert len(replies) == 1
    (received,) = replies
    assert received.has_error() != (how == "none") or how in ("drop-child", "extra-child", "repeat"), how
    if received.has_error():
        assert received.error.code in (faults.OVERSIZED, faults.MALFORMED, faults.MESSAGE_UNAVAILABLE)
        assert received.metadata.src_node_id == AGENT
    else:  # accepted only as exactly what was sent
        assert received.metadata.message_id == honest.metadata.message_id
        expected = honest.content["arrays"]["values"].numpy()
        assert np.array_equal(received.content["arrays"]["values"].numpy(), expected)


def test_an_array_that_repeats_one_chunk_is_measured_before_it_is_inflated():
    """Issue 31, finding 6: an array's body lists its chunks by index, so one uploaded chunk can stand for
    gigabytes; the bytes pulled stay small, the arrays it would build do not."""
    grid, runtime = fake_grid()
    sent = instruction()
    content = RecordDict({"arrays": repeated_chunk_array(64, chunk_bytes=2**16), "metrics": MetricRecord({})})
    message = Message(content, reply_to=sent)
    message.metadata.__dict__["_message_id"] = message.object_id
    proto, tree, objects = wire_form(message)
    assert sum(map(len, objects.values())) < 2**17  # 64 KiB travel
    runtime.announce(proto, tree, objects)
    replies, _ = collected(grid, {sent.metadata.message_id: Instruction(AGENT, MessageType.TRAIN)}, budget=2**20)
    assert [r.error.code for r in replies] == [faults.OVERSIZED]


# -- the listener's rule for push-messages ----------------------------------------------------------


def _push(message: Message, node: int = AGENT) -> PushMessagesRequest:
    proto, tree, _ = wire_form(message)
    return PushMessagesRequest(node=Node(node_id=node), messages_list=[proto], message_object_trees=[tree])


def test_an_honest_reply_passes_the_listener():
    assert push_problem(_push(reply_to(instruction())), max_objects=64) is None


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("src_node_id", OTHER, "the message's source is not the node that sent it"),
        ("dst_node_id", OTHER, "a node sends messages to the SuperLink only"),
        ("reply_to_message_id", "", "a node may only reply, not instruct"),
        ("ttl", 10**9, "the message id is not the hash of its metadata and objects"),
        ("message_type", MessageType.EVALUATE, "the message id is not the hash of its metadata and objects"),
    ],
)
def test_the_listener_refuses_anything_but_a_reply_of_its_own(field, value, problem):
    """Issue 31, findings 1-3: injected instructions (src 1, no reply_to), replies for other nodes, and
    proto metadata that differs from the stored object's."""
    request = _push(reply_to(instruction()))
    setattr(request.messages_list[0].metadata, field, value)
    assert push_problem(request, max_objects=64) == problem


def test_the_listener_refuses_trees_that_are_not_the_message_s_or_too_large():
    message = reply_to(instruction())
    orphan = _push(message)
    del orphan.message_object_trees[0].children[:]
    assert push_problem(orphan, 64) == "the message id is not the hash of its metadata and objects"
    assert push_problem(_push(message), max_objects=3) == "the message declares more than 3 objects"
    two = _push(message)
    two.messages_list.append(two.messages_list[0])
    assert push_problem(two, 64) == "one message per request"


@settings(max_examples=300, deadline=None, database=None)
@given(body=st.binary(max_size=2000))
def test_random_bytes_never_pass_the_listener(body):
    request = PushMessagesRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # the listener answers 403 to what does not parse
        return
    assert push_problem(request, 64)  # a reason, never an exception and never a pass
