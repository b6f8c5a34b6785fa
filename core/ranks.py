"""LoRA factors at another rank, with the product they stand for kept: the rank arithmetic
that coordinator and clients share when clients train at ranks of their own.

peft computes a LoRA layer's weight change as ΔW = s(r)·B·A with B: (d_out, r), A: (r, d_in)
and s(r) = α/r (α/√r with rsLoRA). Clients of different ranks therefore scale the same
factors differently. ``resize`` moves factors from rank r to rank r' by keeping the first
min(r, r') components (zero-padding the rest) and multiplying B and A by √(s(r)/s(r')) each,
so that s(r')·B'·A' equals s(r) times the product of the first min(r, r') components: exact
when padding, a truncation when cutting. Components are kept in order, so when the factors
come from an SVD (FlexLoRA) cutting is the best low-rank approximation, and when they are
HetLoRA's zero-padded averages it is HetLoRA's own truncation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedtune.core.config import AdapterSection
from fedtune.core.plan import role_of

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoraScale:
    """peft's scale s(r) of a LoRA layer's change s(r)·B·A: α/r, or α/√r with rsLoRA (``adapter.alpha``,
    ``adapter.rslora``), one value for every rank."""

    alpha: float
    rslora: bool = False

    @classmethod
    def of(cls, adapter: AdapterSection) -> LoraScale:
        return cls(adapter.alpha, adapter.rslora)

    def at(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank


def rank_of(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank of the LoRA factors in ``tensors`` (None without any); ValueError if they disagree."""
    ranks = {int(t.shape[0]) for n, t in tensors.items() if role_of(n) == "lora_A"}
    ranks |= {int(t.shape[1]) for n, t in tensors.items() if role_of(n) == "lora_B"}
    if len(ranks) > 1:
        raise ValueError(f"LoRA factors of several ranks: {sorted(ranks)}")
    return ranks.pop() if ranks else None


def resize(tensors: Mapping[str, torch.Tensor], rank: int, scale: LoraScale) -> Tensors:
    """The factors in ``tensors`` at ``rank`` (see the module docstring); other tensors unchanged."""
    current = rank_of(tensors)
    if current is None or current == rank:
        return dict(tensors)
    factor = math.sqrt(scale.at(current) / scale.at(rank))
    kept = min(current, rank)
    resized = {}
    for name, value in tensors.items():
        role = role_of(name)
        if role == "lora_A":
            out = value.new_zeros((rank, value.shape[1]))
            out[:kept] = value[:kept] * factor
        elif role == "lora_B":
            out = value.new_zeros((value.shape[0], rank))
            out[:, :kept] = value[:, :kept] * factor
        else:
            out = value
        resized[name] = out
    return resized


def shapes_at_rank(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes ``resize`` gives tensors of SHAPES at ``rank``."""
    resized = {}
    for name, shape in shapes.items():
        role = role_of(name)
        resized[name] = (rank, shape[1]) if role == "lora_A" else (shape[0], rank) if role == "lora_B" else tuple(shape)
    return resized


def factor_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA layer among ``names``, in order."""
    pairs = []
    for name in names:
        if role_of(name) == "lora_A":
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise ValueError(f"{name} has no {partner}")
            pairs.append((name, partner))
    return pairs
