"""FlexLoRA (Bai et al., NeurIPS 2024): aggregate the products, hand each client an SVD at its rank.

Clients of different ranks cannot average factors of different shapes, and averaging factors
is not averaging updates anyway. FlexLoRA averages what the factors stand for: per LoRA layer
the server forms ΔW = Σ_k w_k·s(r_k)·B_k·A_k (example weights w_k, peft's scale s), takes its
SVD U·S·Vᵀ and keeps the top R = ``adapter.r`` components as the global factors
B = U·√S, A = √S·Vᵀ (over s(R)). Cutting those to a client's rank r is the best rank-r
approximation of ΔW (Eckart–Young), which is what each client starts the next round from.
With every client at rank R and R at least the rank of ΔW, the global product is ΔW exactly.
Heads are averaged by examples.
"""

from __future__ import annotations

import torch

from fedtune.core.ranks import factor_pairs
from fedtune.strategies.per_client_rank import PerClientRankStrategy, head_mean
from fedtune.strategies.updates import ClientUpdate, Tensors


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of shapes (d_out, rank), (rank, d_in) with B·A the best rank-``rank`` approximation of DELTA.

    The singular values are split evenly (B = U√S, A = √S Vᵀ), so both factors are on the same
    scale for the clients' next steps; components beyond the matrix's own rank are zero
    (``flexlora_combine`` gives their A rows back a value, so that they can still learn)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tolerance = s[0] * max(delta.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    kept = min(rank, int((s > tolerance).sum()))  # the numerical rank: rounding leaves tiny values
    root = s[:kept].sqrt()
    b = delta.new_zeros((delta.shape[0], rank), dtype=torch.float64)
    a = delta.new_zeros((rank, delta.shape[1]), dtype=torch.float64)
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    return b.float(), a.float()


def flexlora_combine(tensors: list[Tensors], weights: list[float], rank: int, previous: Tensors) -> Tensors:
    """Global factors at RANK from client factors already lifted to that rank's scale.

    A component that ΔW does not fill (zero singular value) would have A and B both zero and
    never receive a gradient again; its A row takes PREVIOUS's row (the global A before this
    round) while its B column stays zero, which leaves the product unchanged."""
    total = float(sum(weights))
    share = [w / total for w in weights]
    names = list(tensors[0])
    pairs = factor_pairs(names)
    combined: Tensors = {}
    for a_name, b_name in pairs:
        delta = sum(p * (t[b_name].double() @ t[a_name].double()) for t, p in zip(tensors, share))
        b, a = svd_factors(delta, rank)
        empty = (b.abs().sum(0) == 0) & (a.abs().sum(1) == 0)
        a[empty] = previous[a_name][empty].float()
        combined[b_name], combined[a_name] = b, a
    return combined | head_mean(tensors, weights)


class FlexLora(PerClientRankStrategy):
    name = "flexlora"
    secure_refusal = "its SVD needs each client's product B_k·A_k"

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return flexlora_combine([u.tensors for u in updates], [u.num_examples for u in updates], self.rank, current)
