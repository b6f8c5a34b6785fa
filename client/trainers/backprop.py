"""Plain backprop LoRA training: AdamW or SGD, local steps, gradient accumulation."""

from __future__ import annotations

import random

import torch

from client.adapters import AdapterModel
from client.data import ExampleSet
from client.trainers.base import TrainResult, to_device
from fedtune.config import ClientSection


def make_optimizer(params: dict[str, torch.nn.Parameter], settings: ClientSection) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)


class BackpropTrainer:
    def train(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        rng: random.Random,
    ) -> TrainResult:
        optimizer = make_optimizer(params, settings)
        batches = data.batches(settings.batch_size, rng)
        model.model.train()
        total_loss, examples = 0.0, 0
        for _ in range(settings.local_steps):
            for _ in range(settings.grad_accum):
                batch = to_device(next(batches), model.device)
                loss = model.model(**batch).loss / settings.grad_accum
                loss.backward()
                total_loss += loss.item()
                examples += len(batch["input_ids"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.model.eval()
        return TrainResult(steps=settings.local_steps, examples=examples, loss=total_loss / settings.local_steps)
