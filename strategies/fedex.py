"""FedEx-LoRA (Singhal et al., 2024): average the factors, fold what averaging misses into the base.

Averaging factors is not averaging updates: B̄·Ā ≠ Σ_k w_k·B_k·A_k. FedEx-LoRA keeps FedAvg's
factors B̄ = Σ w_k B_k, Ā = Σ w_k A_k (example weights w_k) as the new global adapter and adds
the difference s·(Σ w_k B_k A_k − B̄Ā) to every LoRA layer's frozen weight, so the global model
W₀ + R + s·B̄Ā is the exact average of the client models at any rank. With per-client ranks the
factors are first zero-padded to the global rank R (core/ranks.py), so the correction also
makes heterogeneous ranks exact.

The residual R is dense (d_out × d_in per layer) and cumulative: the coordinator holds it in the
global state (checkpointed as ``base_residual.safetensors``) and sends it in every message, so a
client that missed rounds, or restarted, is current after one message. That costs
d_out·d_in numbers per layer and message, always fp32 (MiniLM-L6, query and value: 1.77 M, 7 MB),
counted in ``bytes_down``; a client keeps no residual of its own.
"""

from __future__ import annotations

from fedtune.core.plan import residual_name
from fedtune.core.ranks import factor_pairs
from fedtune.strategies.base_residual import BaseResidualStrategy
from fedtune.strategies.per_client_rank import head_mean
from fedtune.strategies.updates import ClientUpdate, Tensors


def fedex_combine(tensors: list[Tensors], weights: list[float], scale: float, previous: Tensors) -> Tensors:
    """Averaged factors, plus each layer's residual: PREVIOUS's plus SCALE·(Σ w_k B_k A_k − B̄Ā).

    TENSORS are the clients' factors at one rank whose peft scale is SCALE; PREVIOUS holds the
    residuals so far (none before the first round)."""
    total = float(sum(weights))
    share = [w / total for w in weights]
    combined: Tensors = {}
    for a_name, b_name in factor_pairs(list(tensors[0])):
        a = sum(p * t[a_name].double() for t, p in zip(tensors, share))
        b = sum(p * t[b_name].double() for t, p in zip(tensors, share))
        exact = sum(p * (t[b_name].double() @ t[a_name].double()) for t, p in zip(tensors, share))
        name = residual_name(a_name)
        before = previous[name].double() if name in previous else 0.0
        combined[name] = (before + scale * (exact - b @ a)).float()
        combined[a_name], combined[b_name] = a.float(), b.float()
    return combined | head_mean(tensors, weights)


class FedExLora(BaseResidualStrategy):
    name = "fedex"
    secure_refusal = "its residual needs each client's product B_k·A_k"

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        scale = self.scale.at(self.rank)
        return fedex_combine([u.tensors for u in updates], [u.num_examples for u in updates], scale, current)
