"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, merge them into the base, start afresh.

Stacking B = [w_1 B_1, …, w_K B_K] and A = [A_1; …; A_K] gives B·A = Σ_k w_k B_k A_k exactly,
whatever each client's rank: no averaging error and no common rank needed. The server adds
s·B·A to every LoRA layer's frozen weight and re-initialises the adapter (B = 0, A drawn afresh
from a seed of the run and round, so successive rounds add updates from different subspaces);
each round's adapter starts from the merged model. The head, not a LoRA layer, is averaged.

Download cost. The paper sends the stacked factors, K·r·(d_in + d_out) numbers per layer and
round, which only a client present in every round can apply. fedtune instead keeps the
cumulative merge as a dense residual R (d_out × d_in per layer) in the global state
(checkpointed as ``base_residual.safetensors``) and sends it in every message, so a client that
missed rounds or restarted is current after one message: d_out·d_in numbers per layer
(always fp32; MiniLM-L6, query and value: 1.77 M, 7 MB; the stack of 10 clients at rank 8 would be
0.74 M), counted in ``bytes_down``. A client keeps no residual of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.core.config import Config
from fedtune.core.plan import residual_name
from fedtune.core.ranks import LoraScale, factor_pairs
from fedtune.engine.adapters import lora_a_init
from fedtune.strategies.base_residual import BaseResidualStrategy
from fedtune.strategies.per_client_rank import head_mean
from fedtune.strategies.updates import ClientUpdate, Tensors


def stacked(tensors: list[Tensors], share: list[float], a_name: str, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stack of one layer: (B of shape (d_out, Σ r_k), A of shape (Σ r_k, d_in)), weights in B."""
    b = torch.cat([p * t[b_name].double() for t, p in zip(tensors, share)], dim=1)
    a = torch.cat([t[a_name].double() for t in tensors], dim=0)
    return b, a


def flora_combine(
    tensors: list[Tensors], weights: list[float], scale: float, previous: Tensors, fresh_a: Tensors
) -> Tensors:
    """Each layer's residual, PREVIOUS's plus SCALE·(stacked B)·(stacked A); B = 0 and A = FRESH_A.

    TENSORS are the clients' factors at one rank whose peft scale is SCALE."""
    total = float(sum(weights))
    share = [w / total for w in weights]
    combined: Tensors = {}
    for a_name, b_name in factor_pairs(list(tensors[0])):
        b, a = stacked(tensors, share, a_name, b_name)
        name = residual_name(a_name)
        before = previous[name].double() if name in previous else 0.0
        combined[name] = (before + scale * (b @ a)).float()
        combined[a_name] = fresh_a[a_name]
        combined[b_name] = torch.zeros_like(tensors[0][b_name])
    return combined | head_mean(tensors, weights)


class FLoRA(BaseResidualStrategy):
    name = "flora"
    secure_refusal = "it stacks each client's factors"

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed  # of each round's fresh A

    @classmethod
    def from_config(cls, config: Config) -> FLoRA:
        return cls(**cls.common_settings(config), scale=LoraScale.of(config.adapter), seed=config.seed)

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        fresh = {
            a_name: lora_a_init(f"{self.seed}:flora-round-{self.round}", a_name, tuple(current[a_name].shape))
            for a_name, _ in factor_pairs(list(current))
        }
        tensors = [u.tensors for u in updates]
        return flora_combine(tensors, [u.num_examples for u in updates], self.scale.at(self.rank), current, fresh)
