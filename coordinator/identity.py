"""Which agent is behind each Flower node: the name its key was registered under.

With agent keys, the coordinator registers every ``NAME.pub`` under NAME (Flower's
``flwr supernode register --name``), and Flower binds the key to the node it activates.
The ServerApp runs on the coordinator host and asks the SuperLink's Control API (on
loopback, through the coordinator's own flwr CLI configuration in ``FLWR_HOME``) for
the node list; a reply whose ``name`` differs from its node's registered name is
rejected, whatever it claims.
"""

from __future__ import annotations

from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import init_http_client_from_connection
from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

from fedtune.coordinator.superlink import CONNECTION


def registered_names() -> dict[int, str]:
    """Node id -> the name its key was registered under, for every node the SuperLink knows."""
    client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
    try:
        response = client.ListNodes(ListNodesRequest())
    finally:
        client.close()
    return {int(node.node_id): node.name for node in response.nodes_info if node.name}
