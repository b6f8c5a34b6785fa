"""Seeded SPSA perturbations: what a zeroth-order client applies and the coordinator replays.

A ZO step (MeZO, Malladi et al. 2023) perturbs the trained tensors by ``±eps·z`` with
``z ~ N(0, I)`` drawn from a seed, takes the loss difference as the projected gradient
``g``, and moves by ``-lr·g·z``. ``z`` is never stored: it is regenerated from the seed.
The stream of ``z`` covers *all* trained tensors in sorted-name order, drawn on the CPU,
so any machine holding the tensor shapes regenerates the same ``z`` bit for bit. That
lets a client upload only its (seed, g) pairs and learning rates: the coordinator
rebuilds the update of the tensors it shares with ``replay`` (fedtune's "seeds" upload).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class ZOStep:
    """One local step: its learning rate and each perturbation's (seed, projected gradient)."""

    lr: float
    seeds: list[int]
    grads: list[float]


def exact(value: float) -> float:
    """A float as it travels on the wire (float32), so client and replay use the same number."""
    return float(np.float32(value))


def perturb(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], seed: int, scale: float) -> None:
    """``tensors += scale · z(seed)`` in place; ``shapes`` fixes the stream (all trained tensors).

    Tensors missing from ``tensors`` still consume their part of the stream, so a party
    that holds only some of them (the coordinator lacks FedSA's private B) stays aligned.
    """
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(shapes):
        z = torch.randn(tuple(shapes[name]), generator=generator)
        if name in tensors:
            target = tensors[name]
            target.add_(z.to(target.device, target.dtype), alpha=scale)


def apply_step(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], step: ZOStep, weight_decay: float
) -> None:
    """The update of one step: averaged ``-lr·g·z`` over its perturbations, then weight decay."""
    for seed, grad in zip(step.seeds, step.grads, strict=True):
        perturb(tensors, shapes, seed, -step.lr * grad / len(step.seeds))
    if weight_decay:
        for value in tensors.values():
            if value.dim() >= 2:  # weights only, like MeZO: no decay on biases
                value.mul_(1.0 - step.lr * weight_decay)


def replay(
    start: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]], steps: Sequence[ZOStep], weight_decay: float
) -> Tensors:
    """A client's tensors after ``steps``, rebuilt from where its round started."""
    tensors = {name: value.detach().float().clone() for name, value in start.items()}
    with torch.inference_mode():
        for step in steps:
            apply_step(tensors, shapes, step, weight_decay)
    return tensors


def pack(steps: Sequence[ZOStep]) -> np.ndarray:
    """Steps as one byte array: every seed (int64), then every grad and every lr (float32).

    One array, because each array Flower sends carries ~400 bytes of object headers.
    """
    seeds = np.array([s for step in steps for s in step.seeds], dtype="<i8")
    grads = np.array([g for step in steps for g in step.grads], dtype="<f4")
    lrs = np.array([step.lr for step in steps], dtype="<f4")
    return np.frombuffer(seeds.tobytes() + grads.tobytes() + lrs.tobytes(), dtype=np.uint8).copy()


def unpack(buffer: np.ndarray, steps: int, samples: int) -> list[ZOStep]:
    """Inverse of ``pack``; ``ValueError`` with the reason when the buffer does not fit."""
    count = steps * samples
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or steps < 1 or samples < 1:
        raise ValueError("expected a flat byte array and positive step and sample counts")
    if buffer.size != 12 * count + 4 * steps:
        raise ValueError(f"{buffer.size} bytes do not hold {steps} steps x {samples} perturbations")
    raw = buffer.tobytes()
    seeds = np.frombuffer(raw, dtype="<i8", count=count)
    grads = np.frombuffer(raw, dtype="<f4", count=count, offset=8 * count)
    lrs = np.frombuffer(raw, dtype="<f4", count=steps, offset=12 * count)
    if not (np.isfinite(grads).all() and np.isfinite(lrs).all()) or (lrs < 0).any():
        raise ValueError("grads and lrs must be finite, lrs non-negative")
    return [
        ZOStep(
            float(lrs[i]),
            [int(s) for s in seeds[i * samples : (i + 1) * samples]],
            [float(g) for g in grads[i * samples : (i + 1) * samples]],
        )
        for i in range(steps)
    ]
