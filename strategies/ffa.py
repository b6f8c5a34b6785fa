"""FFA-LoRA (Sun et al., ICLR 2024): freeze A at a shared random init, train only B.

Every client builds A from the run's seed (``client/adapters.initial_state``), so A is
identical everywhere without ever being sent; the clients prove it with a checksum in
each reply and the coordinator rejects a reply whose A differs. With A common, FedAvg
of B is exact: mean_k(B_k)·A = mean_k(B_k·A). Only B and the head travel, about half
of FedIT's traffic.
"""

from __future__ import annotations

from fedtune.plan import ParameterPlan
from strategies.base import ClientUpdate, LoraStrategy, Tensors
from strategies.fedit import weighted_mean


class FfaLora(LoraStrategy):
    plan = ParameterPlan(
        trained=frozenset({"lora_B", "head"}),
        sent=frozenset({"lora_B", "head"}),
        frozen=frozenset({"lora_A"}),
    )

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
