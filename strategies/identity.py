"""Which name each Flower node may use in its replies.

Names key everything the coordinator keeps per client (private-state names, ε spent,
privacy-budget retirement), so a node must not speak for another. With agent keys the
name is the one the node's key was registered under (``registered`` looks it up);
without them (simulation, ``--insecure``) names are unauthenticated: a node keeps the
first name it claimed, and no other node may claim it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
