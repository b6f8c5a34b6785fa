"""Flower's internal (non-public) names that fedtune relies on, in one place.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``) does not reach the
wire nor the processes: the objects a message travels as, the Fleet and Runtime protobufs, the
object store's content format, the SuperLink/SuperNode/superexec launchers fedtune adjusts, the
Runtime API client an agent's executor speaks. fedtune imports them here and nowhere else, so a
Flower upgrade that moves them touches this file only (checked with Flower 1.41 and 1.42).

The names most modules need are imported at once; those only a launcher or the agent's executor
needs are imported on first use (``LAZY``, PEP 562), so that a strategy or the CLI does not pay
for Flower's whole runtime at import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE as ARRAY_CHUNK_BYTES
from flwr.common.constant import (
    HEARTBEAT_MIN_INTERVAL,
    SUPERLINK_NODE_ID,
    TIMESTAMP_HEADER,
    TIMESTAMP_TOLERANCE,
    ErrorCode,
    SubStatus,
)
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree, PushObjectRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER,
    FLEET_HTTP_SIGNATURE_HEADER,
    HEAD_BODY_DIVIDER,
    HEAD_VALUE_DIVIDER,
)
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_head_values_from_object_content,
    get_object_id,
    is_valid_sha256_hash,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents, pull_objects
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

LAZY = {  # name -> the Flower module it comes from, imported on first use
    "AcquireTaskRequest": "flwr.proto.runtime_pb2",
    "ListNodesRequest": "flwr.proto.control_pb2",
    "TaskType": "flwr.supercore.constant",
    "HeartbeatSender": "flwr.supercore.heartbeat",
    "make_task_heartbeat_fn_http": "flwr.supercore.heartbeat",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors",
    "SuperExecAuthHttpInterceptor": "flwr.supercore.interceptors.http.superexec_auth",
    "make_simple_http_retry_invoker": "flwr.supercore.retry",
    "RuntimeHttpClient": "flwr.supercore.runtime",
    "pull_task_input": "flwr.supernode.runtime.run_clientapp",
    "push_message": "flwr.supernode.runtime.run_clientapp",
    "push_task_output": "flwr.supernode.runtime.run_clientapp",
    "LaunchResult": "flwr.supercore.superexec.executor",
    "compute_adaptive_noise_params": "flwr.supercore.differential_privacy",
    "build_fab_from_disk": "flwr.cli.build",
    "read_superlink_connection": "flwr.cli.flower_config",
    "init_http_client_from_connection": "flwr.cli.utils",
    "HttpGrid": "flwr.superlink.grid.http_grid",
    # secure aggregation's primitives (core/secagg.py): Flower ships them for its legacy SecAgg+ workflow only
    "generate_key_pairs": "flwr.supercore.primitives.asymmetric",
    "public_key_to_bytes": "flwr.supercore.primitives.asymmetric",
    "private_key_to_bytes": "flwr.supercore.primitives.asymmetric",
    "bytes_to_private_key": "flwr.supercore.primitives.asymmetric",
    "generate_shared_key": "flwr.common.secure_aggregation.crypto.symmetric_encryption",
    "encrypt": "flwr.common.secure_aggregation.crypto.symmetric_encryption",
    "decrypt": "flwr.common.secure_aggregation.crypto.symmetric_encryption",
    "create_shares": "flwr.common.secure_aggregation.crypto.shamir",
    "combine_shares": "flwr.common.secure_aggregation.crypto.shamir",
    "share_keys_plaintext_concat": "flwr.common.secure_aggregation.secaggplus_utils",
    "share_keys_plaintext_separate": "flwr.common.secure_aggregation.secaggplus_utils",
}
MODULES = {  # the Flower modules fedtune's launchers adjust before running them
    "superlink_cli": "flwr.superlink.cli.flower_superlink",
    "superlink_app": "flwr.superlink.main",
    "superexec_cli": "flwr.supercore.cli",
    "superexec_runner": "flwr.supercore.superexec.run_superexec",
    "supernode_cli": "flwr.supernode.cli",
    "supernode_loop": "flwr.supernode.start_client_internal",
    "supernode_fleet": "flwr.supernode.fleet_http_connection",
    "heartbeat": "flwr.supercore.heartbeat",
    "supercore_logger": "flwr.supercore.logger",  # installs Flower's console handler
}

if TYPE_CHECKING:
    from flwr.superlink.grid.http_grid import HttpGrid


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    if name in MODULES:
        return importlib.import_module(MODULES[name])
    raise AttributeError(name)


def task_request_signer(secret: bytes) -> Any:
    """Signs a SuperExec's requests for tasks with SECRET, as Flower's own superexec does."""
    methods = importlib.import_module(MODULES["superexec_runner"])._SUPEREXEC_AUTH_METHODS  # noqa: SLF001
    return __getattr__("SuperExecAuthHttpInterceptor")(master_secret=secret, protected_methods=methods)


def object_body(content: bytes) -> bytes:
    """The body of a deflated object (what follows its header)."""
    return content[content.find(HEAD_BODY_DIVIDER) + len(HEAD_BODY_DIVIDER) :]


def is_http_grid(grid: Any) -> bool:
    """Whether GRID reaches the SuperLink over its Runtime API (deployment; a simulation's grid is in memory)."""
    return isinstance(grid, __getattr__("HttpGrid"))


def grid_runtime(grid: HttpGrid) -> tuple[Any, Any, int]:
    """(Runtime API client, the ServerApp's node, run id) behind Flower's ``HttpGrid``: what its
    ``pull_messages`` uses, so that fedtune can pull and check one reply at a time."""
    return grid._runtime_client, grid.node, grid.run.run_id  # noqa: SLF001


def registered_nodes(connection: str) -> dict[int, str]:
    """Node id -> the name its key was registered under, from the SuperLink's Control API, through the
    flwr CLI connection CONNECTION (the coordinator's own, in its FLWR_HOME)."""
    config = __getattr__("read_superlink_connection")(connection)
    client = __getattr__("init_http_client_from_connection")(config)
    try:
        response = client.ListNodes(__getattr__("ListNodesRequest")())
    finally:
        client.close()
    return {int(node.node_id): node.name for node in response.nodes_info if node.name}


__all__ = [
    "ARRAY_CHUNK_BYTES",
    "FLEET_HTTP_PUBLIC_KEY_HEADER",
    "FLEET_HTTP_SIGNATURE_HEADER",
    "HEAD_BODY_DIVIDER",
    "HEAD_VALUE_DIVIDER",
    "HEARTBEAT_MIN_INTERVAL",
    "SUPERLINK_NODE_ID",
    "TIMESTAMP_HEADER",
    "TIMESTAMP_TOLERANCE",
    "ConfirmMessageReceivedRequest",
    "Error",
    "ErrorCode",
    "ObjectPullError",
    "ObjectTree",
    "ProtoMessage",
    "PullAppMessagesRequest",
    "PushMessagesRequest",
    "PushObjectRequest",
    "SubStatus",
    "bytes_to_public_key",
    "get_all_nested_objects",
    "get_object_head_values_from_object_content",
    "get_object_id",
    "grid_runtime",
    "inflate_object_from_contents",
    "is_http_grid",
    "is_valid_sha256_hash",
    "log",
    "make_message",
    "make_pull_object_fn_protobuf",
    "object_body",
    "pull_objects",
    "registered_nodes",
    "task_request_signer",
    "verify_signature",
    *LAZY,
    *MODULES,
]
