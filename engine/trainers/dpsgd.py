"""DP-SGD with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise.

Opacus' ``GradSampleModule`` computes per-sample gradients of the trained adapter
tensors and its ``DPOptimizer`` clips each to ``privacy.max_grad_norm``, sums, adds
N(0, (σ·max_grad_norm)²) and divides by the expected batch size. Batches are Poisson
samples (each example independently with rate q = batch_size / examples), the sampling
that Opacus' RDP accountant assumes. The trainer owns the client's privacy ledger
(engine/dp_ledger.py), as Opacus' PrivacyEngine owns its accountant: it loads it from the
client's state dir, refuses a round past the budget, advances it once per optimizer step,
saves it, and reports ε in its result; and it makes the client's preflight (is the noise
too loud, is the clip where the gradients are). The Opacus wrapper is removed after the
round, because one model object serves every simulated client of a process.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedtune.core.config import ClientSection, Config
from fedtune.core.dp_accounting import calibrated_noise, clip_warning, dp_random, torch_generator, utility_warning
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import (
    IGNORE_INDEX,
    ExampleSet,
    expected_batch_size,
    physical_chunks,
    poisson_sample,
    sample_rate,
)
from fedtune.engine.dp_ledger import PrivacyLedger
from fedtune.engine.trainers import moments
from fedtune.engine.trainers.backprop import make_optimizer
from fedtune.engine.trainers.base import TrainResult, to_device


class DPSGDTrainer:
    releases_loss = False  # the training loss is not privatised: it stays on the client

    def __init__(
        self,
        ledger: PrivacyLedger,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        secret: random.Random,
        moments_file: Path | None = None,
    ) -> None:
        self.ledger = ledger
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.secret = secret  # Poisson draws and noise; unpredictable unless privacy.seed is set
        self.moments_file = moments_file  # the optimizer's state across rounds (noised gradients only), if kept

    @classmethod
    def for_client(
        cls,
        config: Config,
        state_dir: Path | None,
        examples: int,
        name: str,
        round_number: int,
        steps: int,
        moments_file: Path | None = None,
    ) -> DPSGDTrainer:
        """The client's trainer and its ledger (from STATE_DIR; a fresh one in memory without): σ from
        ``privacy.noise_multiplier``, or calibrated so the planned rounds of STEPS reach target ε."""
        noise, rate = cls.noise_for(config, examples, steps)
        secret = dp_random(config.privacy.seed, name, round_number)
        ledger = PrivacyLedger.load(state_dir, config.privacy.delta) if state_dir else PrivacyLedger(None, config.privacy.delta)
        return cls(ledger, noise, config.privacy.max_grad_norm, rate, secret, moments_file)

    @staticmethod
    def noise_for(config: Config, examples: int, steps: int) -> tuple[float, float]:
        """(σ, Poisson rate) of a client with EXAMPLES training examples taking STEPS per round."""
        privacy = config.privacy
        rate = sample_rate(config.client.batch_size, examples)
        noise = privacy.noise_multiplier
        if noise is None:
            noise = calibrated_noise(privacy.target_epsilon, privacy.delta, rate, config.federation.rounds * steps)
        return noise, rate

    def preflight(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        whose: str,
    ) -> tuple[str | None, str | None]:
        """(the noise-against-signal warning, the clip warning) for a client's first DP-SGD round (its ledger
        has no history yet), else none: printed where it runs, never sent."""
        if self.ledger.accountant.history:
            return None, None
        coordinates = sum(param.numel() for param in params.values())
        return self.utility_warning(coordinates, len(data)), self.clip_warning(model, params, data, settings, whose)

    def utility_warning(self, coordinates: int, examples: int) -> str | None:
        """core/dp_accounting.py's warning for this client's σ, trained COORDINATES and expected batch."""
        return utility_warning(
            "sample", self.noise_multiplier, coordinates, expected_batch_size(self.sample_rate, examples)
        )

    def clip_warning(
        self,
        model: AdapterModel,
        params: dict[str, torch.nn.Parameter],
        data: ExampleSet,
        settings: ClientSection,
        whose: str,
    ) -> str | None:
        """core/dp_accounting.py's clip warning, from norms measured on DATA (WHOSE examples, for the line)."""
        norms = per_example_grad_norms(model, params, data, settings, random.Random(0))  # not the secret draws
        return clip_warning(self.max_grad_norm, norms, whose)

    def refusal(self, target_epsilon: float | None, steps: int) -> str | None:
        """Why this client must not train this round (its budget would be exceeded), else None."""
        if target_epsilon is None:
            return None
        after = self.ledger.epsilon_after(self.noise_multiplier, self.sample_rate, steps)
        if after <= target_epsilon:
            return None
        return (
            f"privacy budget spent: this round would raise ε from {self.ledger.epsilon():.3f} to {after:.3f}, "
            f"over privacy.target_epsilon {target_epsilon:g}"
        )

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
        rate = self.sample_rate
        model.model.train()  # Opacus records activations only in training mode
        total_loss, examples = 0.0, 0
        module = None
        try:
            module = GradSampleModule(model.model, batch_first=True, loss_reduction="mean")
            inner = make_optimizer(params, settings)
            if self.moments_file:
                moments.restore(inner, params, self.moments_file)
            optimizer = DPOptimizer(
                inner,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=expected_batch_size(rate, len(data)),  # = batch_size unless data is smaller
                generator=torch_generator(self.secret, model.device),
            )
            with warnings.catch_warnings():  # LoRA inputs are frozen activations: expected, not a problem
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for _ in range(steps):
                    chosen = poisson_sample(len(data), rate, self.secret)
                    chunks = physical_chunks(chosen, settings.max_physical_batch, data.length)
                    for index, chunk in enumerate(chunks):
                        if chunk:
                            batch = to_device(data.collate(chunk), model.device)
                            loss = example_mean_loss(module, batch, model.task)
                            loss.backward()
                            total_loss += loss.item() * len(chunk) / len(chosen)  # the logical batch's mean
                            examples += len(chunk)
                        else:  # an empty Poisson draw is still a step: noise only
                            for param in params.values():
                                param.grad_sample = torch.zeros((0, *param.shape), device=param.device)
                        if index < len(chunks) - 1:  # clip and add up only: one noisy step per logical batch
                            optimizer.signal_skip_step(do_skip=True)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    self.ledger.step(self.noise_multiplier, rate)
            if self.moments_file:
                moments.keep(inner, params, self.moments_file)
        finally:
            if module is not None:
                module._close()  # remove the hooks and per-sample buffers from the shared model
            model.model.eval()
        self.ledger.save()  # before the reply leaves: a crash after it must not forget the steps
        return TrainResult(
            steps=steps,
            examples=examples,
            loss=total_loss / steps,
            metrics={"noise_multiplier": self.noise_multiplier, "sample_rate": rate, "epsilon": self.ledger.epsilon()},
        )


CLIP_PROBE_EXAMPLES = 64  # examples whose gradient norms the clip preflight measures


def per_example_grad_norms(
    model: AdapterModel,
    params: dict[str, torch.nn.Parameter],
    data: ExampleSet,
    settings: ClientSection,
    rng: random.Random,
    count: int = CLIP_PROBE_EXAMPLES,
) -> list[float]:
    """The norms ``privacy.max_grad_norm`` would clip: each of COUNT random examples' gradient over
    PARAMS at the model's current state, in the client's physical batches.

    A preflight on the caller's own data, printed where it runs and never sent. The gradients are
    cleared afterwards and the shared model is left unwrapped, as training leaves it.
    """
    chosen = rng.sample(range(len(data)), min(count, len(data)))
    norms: list[float] = []
    module = GradSampleModule(model.model, batch_first=True, loss_reduction="mean")
    model.model.train()  # Opacus records activations only in training mode
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for chunk in physical_chunks(chosen, settings.max_physical_batch, data.length):
                if not chunk:
                    continue
                example_mean_loss(module, to_device(data.collate(chunk), model.device), model.task).backward()
                squares = sum(p.grad_sample.flatten(1).double().square().sum(1) for p in params.values())
                norms += squares.sqrt().tolist()
                for param in params.values():
                    param.grad_sample, param.grad = None, None
    finally:
        module._close()
        model.model.eval()
    return norms


def example_mean_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The batch loss as a mean of per-example losses, the form per-sample clipping needs.

    A causal LM's own loss averages over every token in the batch, which would make one
    example's gradient depend on the other examples' lengths; here each example's token
    losses are averaged first. Classification losses are per-example means already.
    """
    if task != "causal-lm":
        return module(**batch).loss
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counted).mean()
