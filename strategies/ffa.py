"""FFA-LoRA (Sun et al., ICLR 2024): freeze A at a shared random init, train only B.

Every client builds A from the run's seed (``engine/adapters.initial_state``), so A is
identical everywhere without ever being sent; the clients prove it with a checksum in
each reply and the coordinator rejects a reply whose A differs. With A common, FedAvg
of B is exact: mean_k(B_k)·A = mean_k(B_k·A). Only B and the head travel, about half
of FedIT's traffic.
"""

from __future__ import annotations

from fedtune.core.plan import ParameterPlan
from fedtune.strategies.base import LoraStrategy


class FfaLora(LoraStrategy):
    """``combine`` is the base class's weighted mean (or robust statistic) of B and the head.

    With ``strategy.robust: trimmed-mean`` / ``median`` the statistic is taken per coordinate
    of B. A is shared and frozen, so ΔW = B·A is linear in B and B alone parametrises every
    client's update: the statistic of B is a robust statistic of the updates themselves, and
    stat(B)·A is the product every client starts from. Exact, unlike FedIT's separate A and B.
    """

    name = "ffa"
    secure_sum = True
    plan = ParameterPlan(
        trained=frozenset({"lora_B", "head"}),
        sent=frozenset({"lora_B", "head"}),
        frozen=frozenset({"lora_A"}),
    )
