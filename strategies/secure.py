"""What a strategy needs under secure aggregation (``federation.secure_aggregation: secagg+``).

The coordinator then learns one number per coordinate: the weighted mean of the clients'
releases (their change from the broadcast), never one client's. A strategy takes it when its
round is that mean and nothing else (``LoraStrategy.secure_sum``): then ``combine_released``
finishes the round from it exactly (to the quantization step). Everything else is refused at
config load, with the reason, because it needs each client's tensors: products B_k·A_k (FLoRA,
FedEx-LoRA, FlexLoRA, LoRA-FAIR), per-client norms (HetLoRA), coordinate-wise statistics
(``strategy.robust`` median and trimmed-mean), per-client seed replays and head probes (ZO).

Weights: the clients' example counts travel in the clear, as they do without secure
aggregation, so ``norm-bound`` still caps them (leave-one-out); the norm clip cannot run on a
sum and is replaced by each client's clip of every coordinate to ±c (``secagg_clip``), which
bounds honest clients only: a hostile one can put any value into its masked vector, and only
the sum's range check (core/secagg.py) limits it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import MetricRecord

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.secagg import MAX_CLIENTS
from fedtune.strategies.base import Aggregate, LoraStrategy
from fedtune.strategies.robust import cap_weights
from fedtune.strategies.updates import Tensors

CLIP_PER_STEP = 4.0  # the default ±c: this many learning rates per local step (AdamW moves a coordinate by ≲ lr a step)


def check_secure_config(config: Config, strategy: type[LoraStrategy], exact: list[str]) -> None:
    """Refuse, with one ``UserError`` line, what secure aggregation cannot run (EXACT: the methods it serves)."""
    fed, client = config.federation, config.client
    if fed.secure_aggregation == "none":
        return
    if not strategy.secure_sum:
        raise UserError(
            f"federation.secure_aggregation: strategy {strategy.name} needs each client's tensors "
            f"({strategy.secure_refusal}); under secure aggregation use one of {', '.join(exact)}"
        )
    if config.strategy.robust in ("median", "trimmed-mean"):
        raise UserError(
            f"strategy.robust {config.strategy.robust}: a coordinate-wise statistic needs each client's values, and "
            "secure aggregation reveals only their sum; use norm-bound (it then caps example counts only) or none"
        )
    if config.privacy.mode == "client":
        raise UserError(
            "privacy.mode client: not with federation.secure_aggregation yet (the coordinator adds DP-FedAvg's noise "
            "to updates it would no longer see; distributed noise is not built); use privacy.mode sample or none"
        )
    zo = client.mode != "backprop" or bool(client.zo_clients)
    if zo and client.zo_upload == "seeds":
        raise UserError(
            "client.zo_upload seeds: the coordinator replays each client's seeds, which a secure sum cannot do; "
            "use client.zo_upload delta under secure aggregation"
        )
    if zo and client.zo_head == "probe":
        raise UserError(
            "client.zo_head probe: a head probe is one client's fit, not a sum; use client.zo_head random under secure aggregation"
        )
    sampled = fed.clients_per_round()
    if sampled < fed.secagg_threshold:
        raise UserError(
            f"federation.secagg_threshold: {fed.secagg_threshold} exceeds the {sampled} clients sampled per round "
            "(federation.clients x federation.fraction); lower it or sample more clients"
        )
    if sampled > MAX_CLIENTS:
        raise UserError(f"federation.secure_aggregation: at most {MAX_CLIENTS} clients per round ({sampled} sampled)")


def clip_range(config: Config) -> float:
    """±c for each coordinate of a client's weighted change: the configured one, or CLIP_PER_STEP
    learning rates per local step (the clipped count in each round's record says when it is too small)."""
    client = config.client
    if config.federation.secagg_clip is not None:
        return float(config.federation.secagg_clip)
    lr = client.zo_lr if client.mode == "zo" else client.lr
    return CLIP_PER_STEP * lr * (client.zo_steps or client.local_steps)


def summary(config: Config) -> str:
    """The one line a secure run starts with: what the coordinator sees, and what robust aggregation still does."""
    fed = config.federation
    line = (
        f"secure aggregation ({fed.secure_aggregation}): the coordinator learns only sums of at least "
        f"{fed.secagg_threshold} clients' changes (and always of a majority of those sampled); each client "
        f"clips every coordinate of its change to ±{clip_range(config):.3g}"
    )
    if config.strategy.robust == "norm-bound":
        line += "; strategy.robust norm-bound caps the example counts only (no update norm is visible to clip)"
    return line


def weights(strategy: LoraStrategy, counts: list[int]) -> tuple[list[float], int]:
    """Each client's weight in (0, 1] from its example count (capped as ``norm-bound`` caps it), and how many were capped."""
    capped, lowered = (
        cap_weights(counts, strategy.robust.max_weight_ratio)
        if strategy.robust.bounded
        else (list(map(float, counts)), 0)
    )
    top = max(capped)
    return [w / top for w in capped], lowered


def release_layout(strategy: LoraStrategy) -> list[tuple[str, tuple[int, ...]]]:
    """The names and shapes of what each client releases this round, in the order both sides flatten them."""
    return [(name, tuple(strategy.current[name].shape)) for name in sorted(strategy.uploaded_names())]


def aggregate_mean(
    strategy: LoraStrategy, server_round: int, mean: np.ndarray, metrics: MetricRecord, stats: dict
) -> Aggregate:
    """The round's new global tensors from the securely summed mean release."""
    tensors: Tensors = {}
    offset = 0
    for name, shape in release_layout(strategy):
        size = math.prod(shape)
        tensors[name] = torch.from_numpy(mean[offset : offset + size].reshape(shape)).float()
        offset += size
    new = {**strategy.current, **strategy.combine_released(strategy.broadcast, tensors)}
    return strategy.finite(new, metrics, stats, server_round)
