"""FedIT: federated instruction tuning with LoRA (Zhang et al., ICASSP 2024).

Plain FedAvg over every adapter tensor: A, B and the task head are trained by every
client and replaced by their example-weighted means. Because mean(B_k)·mean(A_k) is
not mean(B_k·A_k), the aggregate is not the average of the clients' updates; the other
strategies exist to fix or avoid that.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.plan import ROLES, ParameterPlan
from strategies.base import ClientUpdate, LoraStrategy, Tensors


def weighted_mean(tensors: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Σ_k p_k T_k per name, with p_k = w_k / Σ w."""
    total = float(sum(weights))
    return {name: sum((w / total) * t[name] for t, w in zip(tensors, weights)) for name in tensors[0]}


class FedIT(LoraStrategy):
    plan = ParameterPlan(trained=frozenset(ROLES), sent=frozenset(ROLES))

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
