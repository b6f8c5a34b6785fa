"""RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755): train B and A in alternate rounds.

Averaging LoRA factors is not averaging updates: mean_k(B_k)·mean_k(A_k) ≠ mean_k(B_k·A_k).
FFA-LoRA avoids it by never training A, which costs expressiveness. RoLoRA trains one factor
per round while every client holds the other at the value it received: in odd rounds clients
train B (and the head) with A fixed, in even rounds A (and the head) with B fixed, so within a
round mean_k(B_k)·A = mean_k(B_k·A) and B·mean_k(A_k) = mean_k(B·A_k) exactly. B starts at
peft's zero init, so the first round trains B (A's gradient is zero while B is). Messages carry
both factors down (a client needs the one it does not train) and the trained one and the head
up: about half of FedIT's upload.
"""

from __future__ import annotations

from fedtune.core.plan import ROLES, ParameterPlan
from fedtune.strategies.base import LoraStrategy

TRAIN_B = ParameterPlan(trained=frozenset({"lora_B", "head"}), sent=frozenset({"lora_B", "head"}))
TRAIN_A = ParameterPlan(trained=frozenset({"lora_A", "head"}), sent=frozenset({"lora_A", "head"}))


class RoLoRA(LoraStrategy):
    """``combine`` is the base class's weighted mean (or robust statistic) of the round's factor and the
    head; with the other factor common, a statistic of it is a statistic of the updates (as for FFA-LoRA)."""

    name = "rolora"
    secure_sum = True
    plan = TRAIN_B  # round 1's

    def plan_for(self, server_round: int) -> ParameterPlan:
        return TRAIN_B if server_round % 2 else TRAIN_A

    def broadcast_roles(self, server_round: int) -> frozenset[str]:
        return frozenset(ROLES)
