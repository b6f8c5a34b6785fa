"""Plain backprop LoRA training: AdamW or SGD, local steps, gradient accumulation.

Batches are shuffled epochs by default. ``client.sampling: poisson`` draws them the way
DP-SGD does (each example independently at rate batch_size / examples, the batch's mean
loss weighted by its size over the expected size), so that non-private training on the
same sampling separates what DP-SGD's noise and clipping cost from what its sampling costs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fedtune.config import ClientSection
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import ExampleSet, collate, expected_batch_size, poisson_sample, sample_rate
from fedtune.engine.trainers.base import TrainResult, to_device


def make_optimizer(params: dict[str, torch.nn.Parameter], settings: ClientSection) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)


def weighted_batches(
    data: ExampleSet, settings: ClientSection, rng: random.Random
) -> Iterator[tuple[dict[str, torch.Tensor] | None, float]]:
    """Endless (batch, loss weight) pairs; a Poisson draw may be empty (None)."""
    if settings.sampling == "shuffle":
        yield from ((batch, 1.0) for batch in data.batches(settings.batch_size, rng))
        return
    rate = sample_rate(settings.batch_size, len(data))
    expected = expected_batch_size(rate, len(data))
    while True:
        chosen = poisson_sample(len(data), rate, rng)
        batch = collate([data.examples[i] for i in chosen], data.pad_id) if chosen else None
        yield batch, len(chosen) / expected


class BackpropTrainer:
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
        batches = weighted_batches(data, settings, rng)
        model.model.train()
        total_loss, examples = 0.0, 0
        for _ in range(steps):
            for _ in range(settings.grad_accum):
                batch, weight = next(batches)
                if batch is None:
                    continue
                batch = to_device(batch, model.device)
                loss = model.model(**batch).loss * weight / settings.grad_accum
                loss.backward()
                total_loss += loss.item()
                examples += len(batch["input_ids"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.model.eval()
        return TrainResult(steps=steps, examples=examples, loss=total_loss / steps)
