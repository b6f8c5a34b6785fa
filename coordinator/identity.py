"""Which name each Flower node may use: the one its key was registered under, or the first it claimed.

Names key everything the coordinator keeps per client (private-state names, ε spent,
privacy-budget retirement), so a node must not speak for another. Without agent keys
(simulation, ``--insecure``) names are unauthenticated: a node keeps the first name it
claimed, and no other node may claim it.

With agent keys, the coordinator registers every ``NAME.pub`` under NAME (Flower's
``flwr supernode register --name``), and Flower binds the key to the node it activates.
The ServerApp runs on the coordinator host and asks the SuperLink's Control API (on
loopback, through the coordinator's own flwr CLI configuration in ``FLWR_HOME``) for
the node list; a reply whose ``name`` differs from its node's registered name is
rejected, whatever it claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedtune.coordinator.superlink import CONNECTION
from fedtune.core.flower_internals import registered_nodes


def registered_names() -> dict[int, str]:
    """Node id -> the name its key was registered under, for every node the SuperLink knows."""
    return registered_nodes(CONNECTION)


@dataclass
class NodeNames:
    registered: Callable[[], dict[int, str]] | None = None  # node id -> registered name (authenticated)
    bound: dict[int, str] = field(default_factory=dict)

    def check(self, node: int, claimed: str) -> str | None:
        """None when NODE may reply as CLAIMED (binding the name on first use), else why not."""
        if self.registered is not None:
            if node not in self.bound:
                self.bound.update(self.registered())
            expected = self.bound.get(node)
            if expected is None:
                return "its node is not registered under any name"
            return None if claimed == expected else f"claims another name (its key is registered as {expected})"
        if self.bound.get(node, claimed) != claimed:
            return f"claims another name (it is {self.bound[node]} in this run)"
        if any(other != node and name == claimed for other, name in self.bound.items()):
            return "claims a name another node already uses"
        self.bound[node] = claimed
        return None

    def name(self, node: int) -> str:
        """The node's name for log lines: bound, else its id."""
        return self.bound.get(node, f"node {node}")
