"""HetLoRA (Cho et al., EMNLP 2024): zero-pad to the largest rank, weight by norm, cut back.

Each client of rank r trains the first r components of the global factors (the server cuts
them for it, core/ranks.py). The server zero-pads every client's B_k and A_k to the global
rank R (rescaled to peft's scale at R, so s(R)·B_k·A_k is still the client's product) and
averages them with *sparsity weights*: per LoRA layer, p_k ∝ ‖B_k·A_k‖_F, so a client whose
update is small, as the tail components of a low-rank client are, counts less than one that
moved the layer. The averages are the new global factors; the next round cuts them again.
If every client's product of a layer is zero (nothing trained), the example weights are used.
Heads are averaged by examples.

Norm weights let a client with a large product weigh more: the default ``strategy.robust:
norm-bound`` clips each client's update to 3× the round's median norm before this runs.
Not built: HetLoRA's rank self-pruning on the clients.
"""

from __future__ import annotations

import torch

from fedtune.core.ranks import factor_pairs
from fedtune.strategies.per_client_rank import PerClientRankStrategy, head_mean
from fedtune.strategies.updates import ClientUpdate, Tensors


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F without forming B·A: ‖BA‖²_F = trace((BᵀB)(AAᵀ)), two r×r matrices."""
    b, a = b.double(), a.double()
    return float(torch.trace((b.T @ b) @ (a @ a.T)).clamp(min=0.0).sqrt())


def sparsity_weights(norms: list[float], fallback: list[float]) -> list[float]:
    """p_k = N_k / Σ_j N_j for the clients' product norms N_k, or the normalised FALLBACK when all are zero."""
    weights = norms if sum(norms) > 0 else [float(w) for w in fallback]
    total = sum(weights)
    return [w / total for w in weights]


def hetlora_combine(tensors: list[Tensors], weights: list[float]) -> Tensors:
    """Global factors from client factors already zero-padded to the global rank."""
    names = list(tensors[0])
    combined: Tensors = {}
    for a_name, b_name in factor_pairs(names):
        share = sparsity_weights([product_norm(t[b_name], t[a_name]) for t in tensors], weights)
        combined[a_name] = sum(p * t[a_name] for t, p in zip(tensors, share))
        combined[b_name] = sum(p * t[b_name] for t, p in zip(tensors, share))
    return combined | head_mean(tensors, weights)


class HetLora(PerClientRankStrategy):
    name = "hetlora"
    secure_refusal = "its weights are each client's update norm"

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return hetlora_combine([u.tensors for u in updates], [u.num_examples for u in updates])
