"""The interface every local trainer implements, so backprop, zeroth-order and DP-SGD
are interchangeable peers rather than branches inside one loop."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.core.config import ClientSection
from fedtune.core.spsa import ZOStep
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import ExampleSet


@dataclass
class TrainResult:
    steps: int
    examples: int  # examples consumed, counting repeats
    loss: float  # mean training loss over the local steps
    metrics: dict[str, float] = field(default_factory=dict)  # trainer-specific extras
    zo_steps: list[ZOStep] = field(default_factory=list)  # a ZO trainer's seeds, for seed uploads


class Trainer(Protocol):
    releases_loss: bool  # whether the training loss may leave the client (not under DP-SGD)

    def preflight(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        whose: str,
    ) -> tuple[str | None, str | None]:
        """Warnings before a client's first round: (noise against signal, clip against gradients)."""
        ...

    def train(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        rng: random.Random,
        steps: int | None = None,
    ) -> TrainResult:
        """Run STEPS updates of ``params`` (default: ``settings.local_steps``; a ZO trainer's
        ``settings.zo_steps``) on batches drawn from ``data``."""
        ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextmanager
def seeded_torch(seed: int, device: torch.device) -> Iterator[None]:
    """Dropout and other torch randomness from SEED, leaving the process's own RNG untouched.

    A client's round then trains identically whether it runs in the Simulation Engine
    (one process serving every client) or in its own agent process.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
