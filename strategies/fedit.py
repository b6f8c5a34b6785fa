"""FedIT: federated instruction tuning with LoRA (Zhang et al., ICASSP 2024).

Plain FedAvg over every adapter tensor: A, B and the task head are trained by every
client and replaced by their example-weighted means. Because mean(B_k)·mean(A_k) is
not mean(B_k·A_k), the aggregate is not the average of the clients' updates; the other
strategies exist to fix or avoid that.
"""

from __future__ import annotations

from fedtune.core.plan import ROLES, ParameterPlan
from fedtune.strategies.base import LoraStrategy
from fedtune.strategies.robust import weighted_mean

__all__ = ["FedIT", "weighted_mean"]


class FedIT(LoraStrategy):
    """``combine`` is the base class's: the weighted mean, or with ``strategy.robust: trimmed-mean``
    / ``median`` that statistic of A and of B per coordinate, separately (a heuristic: stat(B)·stat(A)
    is not a robust statistic of the products B_k·A_k; strategies/robust.py)."""

    name = "fedit"
    secure_sum = True
    plan = ParameterPlan(trained=frozenset(ROLES), sent=frozenset(ROLES))
