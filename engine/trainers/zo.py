"""Zeroth-order (MeZO-style SPSA) training: two forward passes per perturbation, no autograd.

Per step and perturbation: ``θ += eps·z``, forward, ``θ -= 2·eps·z``, forward, restore θ
exactly (a copy of the trained tensors, which are adapter-sized), ``g = (L+ − L−) / 2eps``;
then ``θ -= lr·mean(g·z)`` with ``z`` regenerated from its seed (core/spsa.py). The
whole step runs under ``torch.inference_mode`` in eval mode (dropout off), so memory
stays at the level of inference: no activations are kept for a backward pass.
"""

from __future__ import annotations

import math
import random

import torch

from fedtune.core.config import ClientSection
from fedtune.core.spsa import ZOStep, apply_step, exact, perturb
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import ExampleSet
from fedtune.engine.trainers.base import TrainResult, to_device


def zo_learning_rate(settings: ClientSection, step: int, round_number: int, rounds: int, steps: int) -> float:
    """``client.zo_lr`` under ``client.zo_schedule``, decaying over the run's ZO steps (STEPS a round)."""
    progress = ((round_number - 1) * steps + step) / max(1, rounds * steps)
    if settings.zo_schedule == "linear":
        return settings.zo_lr * (1.0 - progress)
    if settings.zo_schedule == "cosine":
        return settings.zo_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.zo_lr


class ZOTrainer:
    releases_loss = True  # its training loss goes into the reply

    def preflight(self, *args: object) -> tuple[None, None]:
        """No privacy mechanism, nothing to check before the first round."""
        return None, None

    def __init__(self, round_number: int = 1, rounds: int = 1) -> None:
        self.round_number, self.rounds = round_number, rounds  # position in the lr schedule

    def train(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        rng: random.Random,
        steps: int | None = None,
    ) -> TrainResult:
        for param in params.values():
            param.requires_grad_(False)  # no autograd anywhere in a ZO step
        tensors = {name: param.data for name, param in params.items()}
        shapes = {name: tuple(value.shape) for name, value in tensors.items()}
        saved = {name: value.clone() for name, value in tensors.items()}
        eps = settings.zo_eps
        steps = steps or settings.zo_steps or settings.local_steps
        batches = data.batches(settings.batch_size, rng)
        model.model.eval()
        record: list[ZOStep] = []
        total_loss, examples = 0.0, 0
        with torch.inference_mode():
            for k in range(steps):
                batch = to_device(next(batches), model.device)
                lr = exact(zo_learning_rate(settings, k, self.round_number, self.rounds, steps))
                step = ZOStep(lr, [], [])
                for _ in range(settings.zo_samples):
                    seed = rng.getrandbits(63)
                    perturb(tensors, shapes, seed, eps)
                    plus = model.model(**batch).loss.item()
                    perturb(tensors, shapes, seed, -2.0 * eps)
                    minus = model.model(**batch).loss.item()
                    for name, value in tensors.items():
                        value.copy_(saved[name])
                    step.seeds.append(seed)
                    step.grads.append(exact((plus - minus) / (2.0 * eps)))
                    total_loss += (plus + minus) / 2.0 / settings.zo_samples
                apply_step(tensors, shapes, step, settings.weight_decay)
                for name, value in tensors.items():
                    saved[name].copy_(value)
                record.append(step)
                examples += len(batch["input_ids"])
        return TrainResult(
            steps=steps,
            examples=examples,
            loss=total_loss / steps,
            metrics={"zo_grad_abs": sum(abs(g) for step in record for g in step.grads) / (steps * settings.zo_samples)},
            zo_steps=record,
        )
