"""Differential-privacy pieces both sides share: Opacus accounting, noise calibration, secret randomness.

An accountant's history is a list of (noise multiplier, sample rate, steps); Opacus'
RDP accountant turns it into ε at a given δ. fedtune keeps histories (the client's
for DP-SGD, the coordinator's for client-level DP) and asks Opacus, never its own
formulas.
"""

from __future__ import annotations

import math
import random
import secrets
import statistics
from collections.abc import Sequence

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


def history_epsilon(history: History, delta: float) -> float:
    """ε of a history at δ; ``math.inf`` once any step had no noise."""
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest σ (to Opacus' search tolerance) whose ``steps`` at ``sample_rate`` stay within ε."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    )


def dp_random(seed: int | None, *parts: object) -> random.Random:
    """Randomness for DP sampling and noise: secret unless ``privacy.seed`` makes it repeatable.

    Amplification by sampling and the noise itself assume nobody else can predict
    them; the run seed travels in the run config to every party, so it is not used.
    """
    if seed is None:
        return random.Random(secrets.randbits(128))
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def torch_generator(source: random.Random, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(source.getrandbits(63))


def json_epsilon(epsilon: float) -> float | None:
    """ε for metrics.jsonl: ``null`` stands for infinite (no noise)."""
    return None if math.isinf(epsilon) else round(epsilon, 6)


# Above this noise-to-signal ratio a DP run is very likely to learn nothing (BENCHMARKS.md,
# "DP recipes": the ratio of every measured setting against whether it learned).
NOISE_TO_SIGNAL_LIMIT = 1.0


def noise_to_signal(noise_multiplier: float, coordinates: int, denominator: float) -> float:
    """One step's noise against the most signal it can carry, as norms.

    DP-SGD (DP-FedAvg) averages clipped per-example gradients (client updates) of norm at most
    C over an expected batch (clients per round) of DENOMINATOR and adds N(0, (σC/denominator)²)
    to each of the COORDINATES: the noise's norm is σ·C·√d/denominator, the average's at most
    C. Above ~1 the noise outweighs even perfectly aligned examples; more examples per step
    (clients per round), fewer noised coordinates or a smaller σ (a larger ε) lower it.
    """
    return noise_multiplier * math.sqrt(coordinates) / max(denominator, 1e-12)


def utility_warning(level: str, noise_multiplier: float, coordinates: int, denominator: float) -> str | None:
    """One line when a DP configuration is very likely to learn nothing, saying which knobs help."""
    ratio = noise_to_signal(noise_multiplier, coordinates, denominator)
    if ratio <= NOISE_TO_SIGNAL_LIMIT:
        return None
    if level == "sample":
        what = f"expected batch {denominator:.0f}"
        knobs = (
            "raise client.batch_size (client.max_physical_batch keeps memory low), train fewer coordinates "
            "(a strategy that keeps lora_A frozen, a smaller adapter.r) or raise privacy.target_epsilon"
        )
    else:
        what = f"{denominator:.1f} expected clients per round"
        knobs = (
            "put more clients in each round (federation.clients x federation.fraction), send fewer coordinates "
            "(a strategy that keeps lora_A frozen, a smaller adapter.r) or raise privacy.target_epsilon"
        )
    return (
        f"privacy: the noise is {ratio:.1f}x the largest signal per step (σ {noise_multiplier:.2f}, "
        f"{coordinates:,} noised coordinates, {what}); this run is very likely to learn nothing: {knobs}"
    )


# The clip against the per-example gradient norms it meets (BENCHMARKS.md, "DP recipes": SST-2,
# MiniLM, median norm 1.18, 90th percentile 1.25 at the first step; at ε = 8 a clip of 1 stayed
# at the majority class, 1.5 reached 76.7%, 3 and 10 about 62%).
CLIP_OVER_P90 = 1.2  # the clip to suggest, as a multiple of the 90th-percentile norm
CLIP_EXCESS_LIMIT = 2.0  # above this multiple of the 90th percentile, the noise is needlessly large


def clip_warning(max_grad_norm: float, norms: Sequence[float], whose: str) -> str | None:
    """One line when ``privacy.max_grad_norm`` sits badly against per-example gradient NORMS.

    DP-SGD's noise is σ·C per step whatever the gradients are, so a clip far above the norms
    only adds noise; a clip below most of them scales every example to the same length, which
    weighs a confidently right example like a wrong one, and the head's bias then drifts towards
    the majority class. Near the top of the norms neither happens.
    """
    if not norms:
        return None
    median = statistics.median(norms)
    high = statistics.quantiles(norms, n=10, method="inclusive")[-1] if len(norms) > 1 else norms[0]
    measured = f"per-example gradient norms over {len(norms)} of {whose} examples: median {median:.3g}, 90th percentile {high:.3g}"
    suggestion = f"set privacy.max_grad_norm near {CLIP_OVER_P90 * high:.2g}"
    if max_grad_norm < median:
        return (
            f"privacy: max_grad_norm {max_grad_norm:g} clips most examples ({measured}); clipped to one length, "
            f"they pull the model towards the majority class: {suggestion}"
        )
    if max_grad_norm > CLIP_EXCESS_LIMIT * high:
        return (
            f"privacy: max_grad_norm {max_grad_norm:g} is {max_grad_norm / high:.1f}x the largest usual norm "
            f"({measured}), and DP-SGD's noise grows with it: {suggestion}"
        )
    return None
