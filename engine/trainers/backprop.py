"""Plain backprop LoRA training: AdamW or SGD, local steps, gradient accumulation.

Batches are shuffled epochs by default. ``client.sampling: poisson`` draws them the way
DP-SGD does (each example independently at rate batch_size / examples, the batch's mean
loss weighted by its size over the expected size), so that non-private training on the
same sampling separates what DP-SGD's noise and clipping cost from what its sampling costs.
``client.max_physical_batch`` computes each batch in length-sorted chunks, as DP-SGD does, so
the same recipe without DP runs at large batches too.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from fedtune.core.config import ClientSection
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import (
    IGNORE_INDEX,
    ExampleSet,
    expected_batch_size,
    physical_chunks,
    poisson_sample,
    sample_rate,
)
from fedtune.engine.trainers import moments
from fedtune.engine.trainers.base import TrainResult, to_device


def make_optimizer(params: dict[str, torch.nn.Parameter], settings: ClientSection) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)


def weighted_batches(
    data: ExampleSet, settings: ClientSection, rng: random.Random
) -> Iterator[tuple[list[int], float]]:
    """Endless (example indices, loss weight) pairs; a Poisson draw may be empty."""
    if settings.sampling == "shuffle":
        yield from ((chosen, 1.0) for chosen in data.shuffled(settings.batch_size, rng))
        return
    rate = sample_rate(settings.batch_size, len(data))
    expected = expected_batch_size(rate, len(data))
    while True:
        chosen = poisson_sample(len(data), rate, rng)
        yield chosen, len(chosen) / expected


def averaged_over(batch: dict[str, torch.Tensor], task: str) -> int:
    """What a batch's loss is the mean over: examples, or a causal LM's predicted tokens."""
    if task == "causal-lm":
        return max(1, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    return len(batch["input_ids"])


class BackpropTrainer:
    releases_loss = True  # its training loss goes into the reply

    def preflight(self, *args: object) -> tuple[None, None]:
        """No privacy mechanism, nothing to check before the first round."""
        return None, None

    def __init__(self, moments_file: Path | None = None) -> None:
        self.moments_file = moments_file  # where the optimizer's state is kept across rounds, if it is

    def train(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        rng: random.Random,
        steps: int | None = None,
    ) -> TrainResult:
        steps = steps or settings.local_steps
        optimizer = make_optimizer(params, settings)
        if self.moments_file:
            moments.restore(optimizer, params, self.moments_file)
        batches = weighted_batches(data, settings, rng)
        model.model.train()
        total_loss, examples = 0.0, 0
        for _ in range(steps):
            for _ in range(settings.grad_accum):
                chosen, weight = next(batches)
                chunks = [
                    data.collate(c) for c in physical_chunks(chosen, settings.max_physical_batch, data.length) if c
                ]
                counted = [averaged_over(batch, model.task) for batch in chunks]
                for batch, count in zip(chunks, counted):
                    share = weight * count / sum(counted) / settings.grad_accum  # chunk means -> the batch's mean
                    loss = model.model(**to_device(batch, model.device)).loss * share
                    loss.backward()
                    total_loss += loss.item()
                    examples += len(batch["input_ids"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.model.eval()
        if self.moments_file:
            moments.keep(optimizer, params, self.moments_file)
        return TrainResult(steps=steps, examples=examples, loss=total_loss / steps)
