"""Flower's internal (non-public) names that fedtune relies on, in one place.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``) does not reach the
wire: the objects a message travels as, the Fleet and Runtime protobufs, the object store's
content format. fedtune checks untrusted messages at that level, so it imports them here and
nowhere else; a Flower upgrade that moves them touches this file only.
"""

from __future__ import annotations

from typing import Any

from flwr.app.message import make_message
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as ARRAY_CHUNK_BYTES
from flwr.common.constant import SUPERLINK_NODE_ID, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.common.serde import message_from_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    HEAD_BODY_DIVIDER,
    HEAD_VALUE_DIVIDER,
)
from flwr.supercore.inflatable.inflatable_object import (
    get_object_head_values_from_object_content,
    get_object_id,
    is_valid_sha256_hash,
    iterate_object_tree,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS
from flwr.superlink.grid.http_grid import HttpGrid


def task_request_signer(secret: bytes) -> SuperExecAuthHttpInterceptor:
    """Signs a SuperExec's requests for tasks with SECRET, as Flower's own superexec does."""
    return SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=_SUPEREXEC_AUTH_METHODS)


def object_body(content: bytes) -> bytes:
    """The body of a deflated object (what follows its header)."""
    return content[content.find(HEAD_BODY_DIVIDER) + len(HEAD_BODY_DIVIDER) :]


def is_http_grid(grid: Any) -> bool:
    """Whether GRID reaches the SuperLink over its Runtime API (deployment; a simulation's grid is in memory)."""
    return isinstance(grid, HttpGrid)


def grid_runtime(grid: Any) -> tuple[Any, Any, int]:
    """(Runtime API client, the ServerApp's node, run id) behind Flower's ``HttpGrid``: what its
    ``pull_messages`` uses, so that fedtune can pull and check one reply at a time."""
    return grid._runtime_client, grid.node, grid.run.run_id  # noqa: SLF001


__all__ = [
    "ARRAY_CHUNK_BYTES",
    "FLEET_HTTP_PUBLIC_KEY_HEADER",
    "FLEET_HTTP_SIGNATURE_HEADER",
    "HEAD_BODY_DIVIDER",
    "HEAD_VALUE_DIVIDER",
    "SUPERLINK_NODE_ID",
    "TIMESTAMP_HEADER",
    "TIMESTAMP_TOLERANCE",
    "ConfirmMessageReceivedRequest",
    "ObjectPullError",
    "ObjectTree",
    "ProtoMessage",
    "PullAppMessagesRequest",
    "PushMessagesRequest",
    "bytes_to_public_key",
    "get_object_head_values_from_object_content",
    "get_object_id",
    "inflate_object_from_contents",
    "grid_runtime",
    "is_valid_sha256_hash",
    "is_http_grid",
    "iterate_object_tree",
    "make_message",
    "make_pull_object_fn_protobuf",
    "message_from_proto",
    "object_body",
    "pull_objects",
    "task_request_signer",
    "verify_signature",
]
