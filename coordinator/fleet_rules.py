"""What a message from the network must be before Flower stores it or fedtune reads it: pure checks.

Flower's Fleet API authenticates the *request* (its node id is bound to the signing key), but
stores whatever message the request carries: one whose protobuf says it comes from the
SuperLink (id 1) and answers nothing is stored as an instruction, to any node, and the
ServerApp's pull returns every instruction addressed to node 1 beside its replies. The
message's metadata also travels twice: in the protobuf Flower checks and inside the stored
``Message`` object the ServerApp inflates, which nobody compares. And the object tree a node
declares need not be the tree its objects form, nor bounded. The checks below close each gap:

- ``push_problem`` (the public listener, before Flower sees the request): one message per
  request, from the requesting node, to the SuperLink, answering an instruction, with empty
  inline content, whose id is the hash of exactly this metadata and the tree's first level
  (so the stored object, which the object store keeps only under its own hash, holds this
  metadata), and whose tree is bounded.
- ``reply_problem`` (the ServerApp, before it pulls a reply): the reply answers an instruction
  of the current collection, from the node that instruction went to, of the same type.
- ``contents_problem`` (the ServerApp, after pulling, before inflating): every object is
  present, hashes to its id and names exactly the children the tree gave it, so inflation
  follows the tree whose size was bounded; ``array_bytes`` then measures the arrays it would
  build, whose chunks are listed by index with repeats (one uploaded chunk can stand for
  gigabytes), so they are held against the plan before they exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from fedtune.core.flower_internals import (
    HEAD_BODY_DIVIDER,
    HEAD_VALUE_DIVIDER,
    SUPERLINK_NODE_ID,
    ObjectTree,
    ProtoMessage,
    PushMessagesRequest,
    get_object_head_values_from_object_content,
    get_object_id,
    is_valid_sha256_hash,
    object_body,
)

MAX_TREE_DEPTH = 8  # Message > RecordDict > ArrayRecord > Array > ArrayChunk: 5 levels
MESSAGE_OBJECT_TYPE, ARRAY_OBJECT_TYPE = "Message", "Array"


@dataclass(frozen=True)
class Instruction:
    """A message the ServerApp sent and awaits one reply to."""

    node_id: int
    message_type: str


def walk(tree: ObjectTree) -> Iterator[tuple[ObjectTree, int]]:
    """Every node of TREE with its depth (the root is 1), repeated children included, without recursion."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in node.children)


def tree_problem(tree: ObjectTree, max_objects: int) -> str | None:
    """Why TREE cannot be a message's object tree of at most MAX_OBJECTS references, or None."""
    for count, (node, depth) in enumerate(walk(tree), start=1):
        if count > max_objects:
            return f"the message declares more than {max_objects} objects"
        if depth > MAX_TREE_DEPTH:
            return f"the message's objects nest deeper than {MAX_TREE_DEPTH} levels"
        if not is_valid_sha256_hash(node.object_id):
            return "an object id is not a sha256 hash"
    return None


def declared_message_id(message: ProtoMessage, tree: ObjectTree) -> str:
    """The id of the ``Message`` object that holds MESSAGE's metadata (and error) and TREE's first level.

    Flower's ``Message.deflate`` with the message id left out, as the object's own hash is the id.
    """
    metadata = type(message.metadata)()
    metadata.CopyFrom(message.metadata)
    metadata.message_id = ""
    error = message.error if message.HasField("error") else None
    body = ProtoMessage(metadata=metadata, content=None, error=error).SerializeToString(deterministic=True)
    children = ",".join(child.object_id for child in tree.children)
    head = HEAD_VALUE_DIVIDER.join((MESSAGE_OBJECT_TYPE, children, str(len(body))))
    return get_object_id(head.encode() + HEAD_BODY_DIVIDER + body)


def push_problem(request: PushMessagesRequest, max_objects: int) -> str | None:
    """Why a Fleet ``push-messages`` request must not reach Flower, or None: it must carry one reply
    from the requesting node to the SuperLink whose stored metadata is exactly the one checked."""
    if len(request.messages_list) != 1 or len(request.message_object_trees) != 1:
        return "one message per request"
    message, tree = request.messages_list[0], request.message_object_trees[0]
    metadata = message.metadata
    if metadata.src_node_id != request.node.node_id:
        return "the message's source is not the node that sent it"
    if metadata.dst_node_id != SUPERLINK_NODE_ID:
        return "a node sends messages to the SuperLink only"
    if not metadata.reply_to_message_id:
        return "a node may only reply, not instruct"
    if message.content.ByteSize():
        return "content travels as objects, not inline"
    if problem := tree_problem(tree, max_objects):
        return problem
    if tree.object_id != metadata.message_id or declared_message_id(message, tree) != metadata.message_id:
        return "the message id is not the hash of its metadata and objects"
    return None


def reply_problem(message: ProtoMessage, instruction: Instruction, run_id: int) -> str | None:
    """Why a pulled reply does not answer INSTRUCTION (the one its ``reply_to`` names), or None."""
    metadata = message.metadata
    if metadata.run_id != run_id or metadata.dst_node_id != SUPERLINK_NODE_ID:
        return "not a reply of this run to the SuperLink"
    if metadata.src_node_id != instruction.node_id:
        return "a reply from a node the instruction did not go to"
    if metadata.message_type != instruction.message_type:
        return "a reply of another message type than its instruction"
    return None


def contents_problem(tree: ObjectTree, contents: Mapping[str, bytes]) -> str | None:
    """Why CONTENTS (object id -> deflated object) do not form exactly TREE, or None."""
    for node, depth in walk(tree):
        content = contents.get(node.object_id)
        if content is None:
            return "an object of its tree is missing"
        if get_object_id(content) != node.object_id:
            return "an object does not hash to its id"
        try:
            kind, children, _ = get_object_head_values_from_object_content(content)
        except (ValueError, UnicodeDecodeError):
            return "an object has no valid header"
        if depth == 1 and kind != MESSAGE_OBJECT_TYPE:
            return "its root object is not a Message"
        if children != [child.object_id for child in node.children]:
            return "an object names other children than its tree"
        if kind == ARRAY_OBJECT_TYPE and _chunk_indices(content, len(children)) is None:
            return "an array's list of chunks is not valid"
    return None


def array_bytes(tree: ObjectTree, contents: Mapping[str, bytes]) -> int:
    """The bytes the arrays of a message would hold once inflated: an array lists its chunks by index,
    repeats allowed, so one uploaded chunk can stand for gigabytes. CONTENTS passed ``contents_problem``."""
    total = 0
    for node, _ in walk(tree):
        content = contents[node.object_id]
        if get_object_head_values_from_object_content(content)[0] == ARRAY_OBJECT_TYPE:
            sizes = [len(object_body(contents[child.object_id])) for child in node.children]
            total += sum(sizes[index] for index in _chunk_indices(content, len(sizes)) or [])
    return total


def _chunk_indices(array: bytes, chunks: int) -> list[int] | None:
    """The chunk indices a deflated ``Array`` lists (Flower's ``arraychunk_ids``), or None if malformed."""
    try:
        indices = json.loads(object_body(array))["arraychunk_ids"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(indices, list) or not all(type(i) is int and 0 <= i < chunks for i in indices):
        return None
    return indices
