"""Client-level DP (DP-FedAvg, McMahan et al. 2018), inside fedtune's strategy layer.

Each client's update Δ_k (its sent tensors minus the broadcast it started from) is
clipped as one vector to norm C; the server averages the clipped updates with equal
weights and adds N(0, (z·C/m)²) to every coordinate of the mean, m = clients
aggregated. Opacus' RDP accountant charges one step of the sampled Gaussian mechanism
per round at sampling rate m / ``federation.clients``, so a round in which a client
failed is accounted with the clients actually aggregated.

Adaptive clipping (Andrew et al. 2021): clients' "unclipped" bits are summed with
Gaussian noise and C moves geometrically toward the ``target_quantile`` of update
norms. The bit count costs privacy too; Flower's ``compute_adaptive_noise_params``
splits z between the update and the count so the total is still charged as z.

Why not Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers: they skip a
whole round when any reply fails, expect every reply to carry the whole model as a
plain ``ArrayRecord`` (ours carry codec-packed sent tensors or ZO seeds), and do not
account.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedtune.config import Config
from fedtune.errors import UserError
from fedtune.privacy import History, calibrated_noise, dp_random, history_epsilon, torch_generator
from strategies.base import ClientUpdate, Tensors


def update_norm(start: Tensors, tensors: Tensors) -> float:
    return math.sqrt(sum(float((tensors[k].float() - start[k].float()).square().sum()) for k in tensors))


def clip_update(start: Tensors, tensors: Tensors, clip_norm: float) -> Tensors:
    """start + (tensors − start)·min(1, C/‖tensors − start‖): the update as one vector."""
    scale = min(1.0, clip_norm / max(update_norm(start, tensors), 1e-12))
    return {k: start[k] + scale * (tensors[k].float() - start[k].float()) for k in tensors}


@dataclass
class ClientLevelDP:
    noise_multiplier: float  # z charged by the accountant (update and bit count together)
    clip_norm: float  # C; moves each round with adaptive clipping
    delta: float
    population: int  # federation.clients: the sampling rate's denominator
    planned_clients: int  # clients sampled per round, for the budget check before a round
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0  # noise on the unclipped-bit count (adaptive only)
    update_noise: float = 0.0  # z of the update itself (= z without adaptive clipping)
    seed: int | None = None
    history: History = field(default_factory=list)

    @classmethod
    def from_config(cls, config: Config) -> ClientLevelDP:
        privacy, fed = config.privacy, config.federation
        planned = fed.clients_per_round()
        noise = privacy.noise_multiplier
        if noise is None:
            noise = calibrated_noise(privacy.target_epsilon, privacy.delta, planned / fed.clients, fed.rounds)
        count_stddev, update_noise = 0.0, noise
        if privacy.adaptive_clipping:
            try:
                count_stddev, update_noise = compute_adaptive_noise_params(noise, planned, privacy.clipped_count_stddev)
            except ValueError:
                raise UserError(
                    f"privacy.clipped_count_stddev: must exceed noise_multiplier/2 = {noise / 2:g} for adaptive "
                    f"clipping (default clients per round / 20 = {planned / 20:g}); raise it or turn "
                    "adaptive_clipping off"
                ) from None
        return cls(
            noise_multiplier=noise,
            clip_norm=privacy.clip_norm,
            delta=privacy.delta,
            population=fed.clients,
            planned_clients=planned,
            target_epsilon=privacy.target_epsilon,
            adaptive=privacy.adaptive_clipping,
            target_quantile=privacy.target_quantile,
            clip_lr=privacy.clip_lr,
            count_stddev=count_stddev,
            update_noise=update_noise,
            seed=privacy.seed,
        )

    def epsilon(self) -> float:
        return history_epsilon(self.history, self.delta)

    def refusal(self) -> str | None:
        """Why the next round must not run (it would exceed the target ε), else None."""
        if self.target_epsilon is None:
            return None
        rate = self.planned_clients / self.population
        after = history_epsilon([*self.history, (self.noise_multiplier, rate, 1)], self.delta)
        if after <= self.target_epsilon:
            return None
        return (
            f"privacy budget reached: one more round would raise ε from {self.epsilon():.3f} to {after:.3f}, "
            f"over privacy.target_epsilon {self.target_epsilon:g}"
        )

    def clip(self, start: Tensors, updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], list[float]]:
        """Clipped updates with equal weights, and each client's update norm before clipping."""
        norms = [update_norm(start, u.tensors) for u in updates]
        clipped = [replace(u, tensors=clip_update(start, u.tensors, self.clip_norm), num_examples=1) for u in updates]
        return clipped, norms

    def noise(self, mean: Tensors, clients: int, round_number: int) -> Tensors:
        """The mean of ``clients`` clipped updates plus the Gaussian mechanism's noise; accounts the round."""
        generator = torch_generator(dp_random(self.seed, "client-dp", round_number))
        stddev = self.update_noise * self.clip_norm / clients
        noised = {k: v + stddev * torch.randn(v.shape, generator=generator) for k, v in mean.items()}
        self.history.append((self.noise_multiplier, clients / self.population, 1))
        return noised

    def adapt(self, norms: list[float], round_number: int) -> None:
        """C ← C·exp(−η(b̄ − γ)), b̄ the noisy fraction of updates that were not clipped."""
        if not self.adaptive:
            return
        unclipped = sum(norm <= self.clip_norm for norm in norms)
        noise = dp_random(self.seed, "clip-count", round_number).gauss(0.0, self.count_stddev)
        fraction = (unclipped + noise) / len(norms)
        self.clip_norm *= math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history], "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state["history"]]
        self.clip_norm = float(state["clip_norm"])
