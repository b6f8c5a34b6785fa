"""Robust aggregation: bounds on what one client can do to a round, and robust statistics.

Pure tensor math on lists of ``{name: tensor}`` dicts (no Flower), applied by
``LoraStrategy.aggregate`` before the strategy's ``combine`` (``strategy.robust``):

- ``none``: no bounds, the example-weighted mean (fedtune before robust aggregation).
- ``norm-bound`` (default): two bounds, then the strategy's usual weighted combine.
  (1) weights: a client's ``num-examples`` counts at most ``max_weight_ratio`` × the
  median count of the *other* clients, so one client claiming 10⁹ examples gets the weight
  of three typical clients, not all of it. (2) norms: a client's update u_k = sent_k −
  broadcast (the round's broadcast as the clients decoded it) is one float64 vector over
  all sent tensors; if ‖u_k‖ > ``norm_bound`` × the median of the other clients' norms it
  is scaled down to that length (clipped, not rejected: an honest client with an unusually
  large step still counts). The reference leaves the client out, so no client sets its own
  bound: with the round's plain median, one of two replies *was* the median. What this
  promises, by the number K of replies in the round:
  K ≥ 3: one client moves the global model by at most share·bound·(median norm of the
  others), share ≤ ratio·m / (ratio·m + the other clients' counts), m the others' median
  count; K = 2: each reply is bounded by the other at factors of at most 1, so neither
  counts for more nor moves further than the other (a hostile one can cancel the honest
  update, not replace it); K = 1: nothing to compare with, the reply is used as is
  (``federation.min_clients`` ≥ 2, the default, never updates from one reply).
- ``trimmed-mean``: the bounds, then per coordinate the mean after dropping the
  ⌊``trim_fraction``·K⌋ smallest and largest of the K clients' values (unweighted).
- ``median``: the bounds, then the per-coordinate median (unweighted; the mean of the
  two middle values for even K).

Where a coordinate-wise statistic is exact and where it is a heuristic. The statistics run
on what clients send, not on the model change ΔW = B·A they imply:

- FFA-LoRA: A is shared and frozen, so ΔW = B·A is linear in B and B alone parametrises
  the update; a robust statistic of B per coordinate is a robust statistic of the
  clients' updates in that parametrisation, and statistic(B)·A is the product the
  server broadcasts. Exact in the sense that nothing is lost by treating B alone.
- FedIT and LoRA-FAIR: A and B are robustified separately, so stat(B)·stat(A) is not a
  robust statistic of the products B_k·A_k (the same mismatch FedIT has with means); a
  heuristic. FAIR's correction then pulls stat(B) towards the weighted mean of the
  *bounded* clients' products, so a clipped, capped hostile client still enters the
  correction's target with its bounded weight.
- FedSA-LoRA: only A (and a shared head) is sent; a robust statistic of A per
  coordinate is a heuristic for the same reason (each client's B is paired with it).

Under client-level DP (``privacy.mode: client``) the DP clip to C with equal weights
already bounds every client, and a bound relative to the round's median would make one
client's release depend on the others' updates (breaking the sensitivity argument), so
the bounds are not applied and the coordinate-wise statistics are refused at config load.
Under sample-level DP all of this is post-processing of the clients' DP releases.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune.core.config import StrategySection

Tensors = dict[str, torch.Tensor]
METHODS = ("none", "norm-bound", "trimmed-mean", "median")


@dataclass(frozen=True)
class RobustSettings:
    method: str = "norm-bound"
    max_weight_ratio: float = 3.0
    norm_bound: float = 3.0
    trim_fraction: float = 0.2

    @classmethod
    def from_config(cls, section: StrategySection) -> RobustSettings:
        return cls(section.robust, section.max_weight_ratio, section.norm_bound, section.trim_fraction)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"robust aggregation {self.method!r}: use one of {', '.join(METHODS)}")

    @property
    def bounded(self) -> bool:
        """Whether weights are capped and update norms clipped (every method but ``none``)."""
        return self.method != "none"

    @property
    def coordinatewise(self) -> bool:
        """Whether a per-coordinate statistic replaces the weighted mean."""
        return self.method in ("trimmed-mean", "median")


@dataclass
class Bounded:
    """The round's client tensors and weights after the bounds, and how many were changed."""

    tensors: list[Tensors]
    weights: list[float]
    clipped: int  # updates scaled down to norm_bound × the median update norm
    capped: int  # weights lowered to max_weight_ratio × the median count


def weighted_mean(tensors: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Σ_k p_k T_k per name, with p_k = w_k / Σ w."""
    total = float(sum(weights))
    return {name: sum((w / total) * t[name] for t, w in zip(tensors, weights)) for name in tensors[0]}


def others_bounds(values: Sequence[float], factor: float) -> list[float]:
    """Each client's bound: FACTOR × the median of the *other* clients' values, so that no client sets
    its own. With two clients each is bounded by the other, at a factor of at most 1 (neither counts
    for more, nor moves further, than the other); a lone client has no reference (infinite bound)."""
    if len(values) < 2:
        return [math.inf] * len(values)
    factor = factor if len(values) > 2 else min(factor, 1.0)
    return [factor * statistics.median([v for j, v in enumerate(values) if j != k]) for k in range(len(values))]


def cap_weights(counts: Sequence[float], ratio: float) -> tuple[list[float], int]:
    """Each count limited to ``ratio`` × the median of the other counts, and how many were lowered."""
    limits = others_bounds([float(n) for n in counts], ratio)
    return [min(float(n), limit) for n, limit in zip(counts, limits)], sum(n > lim for n, lim in zip(counts, limits))


def update_norms(tensors: Sequence[Tensors], starts: Sequence[Tensors]) -> list[float]:
    """‖T_k − R_k‖ over all of T_k's tensors as one vector, in float64; R_k is where client k started."""
    return [
        math.sqrt(sum(float((t.double() - start[name].double()).square().sum()) for name, t in update.items()))
        for update, start in zip(tensors, starts, strict=True)
    ]


def clip_updates(tensors: Sequence[Tensors], starts: Sequence[Tensors], bound: float) -> tuple[list[Tensors], int]:
    """Updates (T_k − R_k) longer than ``bound`` × the median of the other updates' norms scaled to that length."""
    norms = update_norms(tensors, starts)
    result, clipped = [], 0
    for update, reference, norm, limit in zip(tensors, starts, norms, others_bounds(norms, bound)):
        if norm <= limit:
            result.append(dict(update))
            continue
        scale = limit / norm
        result.append({name: (start := reference[name].float()) + scale * (t - start) for name, t in update.items()})
        clipped += 1
    return result, clipped


def bound_updates(
    tensors: Sequence[Tensors], counts: Sequence[float], starts: Sequence[Tensors], settings: RobustSettings
) -> Bounded:
    """Both bounds of ``norm-bound`` (also applied before ``trimmed-mean`` and ``median``).

    ``starts[k]`` is what client k started from: the round's broadcast, or with per-client
    ranks the broadcast at that client's rank (strategies/per_client_rank.py)."""
    weights, capped = cap_weights(counts, settings.max_weight_ratio)
    clipped_tensors, clipped = clip_updates(tensors, starts, settings.norm_bound)
    return Bounded(clipped_tensors, weights, clipped, capped)


def trimmed_mean(tensors: Sequence[Tensors], fraction: float) -> Tensors:
    """Per coordinate: drop the ⌊fraction·K⌋ smallest and largest values, average the rest (unweighted)."""
    k = len(tensors)
    trim = math.floor(fraction * k)
    result = {}
    for name in tensors[0]:
        values = torch.stack([t[name] for t in tensors]).sort(dim=0).values
        result[name] = values[trim : k - trim].mean(dim=0)
    return result


def coordinate_median(tensors: Sequence[Tensors]) -> Tensors:
    """Per coordinate median (unweighted); for an even count, the mean of the two middle values."""
    k = len(tensors)
    result = {}
    for name in tensors[0]:
        values = torch.stack([t[name] for t in tensors]).sort(dim=0).values
        result[name] = values[(k - 1) // 2] if k % 2 else (values[k // 2 - 1] + values[k // 2]) / 2
    return result


def aggregate_tensors(tensors: Sequence[Tensors], weights: Sequence[float], settings: RobustSettings) -> Tensors:
    """The round's central value of each sent tensor: weighted mean, trimmed mean or median."""
    if settings.method == "trimmed-mean":
        return trimmed_mean(tensors, settings.trim_fraction)
    if settings.method == "median":
        return coordinate_median(tensors)
    return weighted_mean(tensors, weights)
