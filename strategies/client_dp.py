"""Client-level DP (DP-FedAvg, McMahan et al. 2018), inside fedtune's strategy layer.

Each round's clients are a Poisson sample of the connected clients at rate
q = ``federation.fraction``, drawn with secret randomness. Each client's update Δ_k (its
sent tensors minus the broadcast it decoded; for LoRA-FAIR also the change of each
module's product B_k·A_k, which FAIR's correction reads) is clipped as one vector to
norm C; the server adds N(0, (z·C)²) to the sum of the clipped updates and divides by the expected
number of clients q·N (a fixed denominator, so the number of participants is not part
of what is released). Opacus' RDP accountant charges one step of the sampled Gaussian
mechanism per round at rate q: a client that fails mid-round does not lower the rate
(it could have been sampled), and the round is kept with the replies that came.

Adaptive clipping (Andrew et al. 2021): the centred "unclipped" bits b_k − ½ are summed
with Gaussian noise and C moves geometrically toward the ``target_quantile`` of update
norms. The bit count costs privacy too; Flower's ``compute_adaptive_noise_params``
splits z between the update and the count so the total is still charged as z.

Why not Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers: they skip a
whole round when any reply fails, expect every reply to carry the whole model as a
plain ``ArrayRecord`` (ours carry codec-packed sent tensors or ZO seeds), sample clients
with the strategy's own (seeded) sampler, and do not account.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedtune.config import Config
from fedtune.dp_accounting import History, calibrated_noise, dp_random, history_epsilon, torch_generator
from fedtune.errors import UserError
from fedtune.strategies.base import ClientUpdate, Tensors


@dataclass
class ClientLevelDP:
    noise_multiplier: float  # z charged by the accountant (update and bit count together)
    clip_norm: float  # C; moves each round with adaptive clipping
    delta: float
    sample_rate: float  # q: each connected client's chance to be in a round
    expected_clients: float  # q·federation.clients: the fixed denominator of the mean
    target_epsilon: float | None = None
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0  # noise on the centred unclipped-bit count (adaptive only)
    update_noise: float = 0.0  # z of the update itself (= z without adaptive clipping)
    seed: int | None = None
    history: History = field(default_factory=list)
    draws: int = 0  # client samples drawn so far (retries draw again)

    @classmethod
    def from_config(cls, config: Config) -> ClientLevelDP:
        privacy, fed = config.privacy, config.federation
        rate, expected = fed.fraction, fed.fraction * fed.clients
        noise = privacy.noise_multiplier
        if noise is None:
            noise = calibrated_noise(privacy.target_epsilon, privacy.delta, rate, fed.rounds)
        count_stddev, update_noise = 0.0, noise
        if privacy.adaptive_clipping:
            stddev = privacy.clipped_count_stddev
            try:
                count_stddev, update_noise = compute_adaptive_noise_params(noise, expected, stddev)
            except ValueError:
                raise UserError(
                    f"privacy.clipped_count_stddev: must exceed noise_multiplier/2 = {noise / 2:g} for adaptive "
                    f"clipping (default expected clients per round / 20 = {expected / 20:g}); raise it or turn "
                    "adaptive_clipping off"
                ) from None
        return cls(
            noise_multiplier=noise,
            clip_norm=privacy.clip_norm,
            delta=privacy.delta,
            sample_rate=rate,
            expected_clients=expected,
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
        after = history_epsilon([*self.history, (self.noise_multiplier, self.sample_rate, 1)], self.delta)
        if after <= self.target_epsilon:
            return None
        return (
            f"privacy budget reached: one more round would raise ε from {self.epsilon():.3f} to {after:.3f}, "
            f"over privacy.target_epsilon {self.target_epsilon:g}"
        )

    def sample(self, nodes: list[int], round_number: int) -> list[int]:
        """This round's clients: each connected node independently with probability q, secretly."""
        self.draws += 1
        source = dp_random(self.seed, "clients", round_number, self.draws)
        return [node for node in nodes if source.random() < self.sample_rate]

    def aggregate(
        self, released: Callable[[ClientUpdate], Tensors], updates: list[ClientUpdate], round_number: int
    ) -> tuple[Tensors, list[float]]:
        """(Σ_k clip(v_k) + N(0, (z·C)²)) / (q·N) over what each client releases, v_k = released(update_k),
        and each v_k's norm before clipping.

        v_k is one vector for clipping, whatever its parts (FAIR adds the change of B_k·A_k to the update),
        so the round is one Gaussian mechanism; it is charged to the accountant here.
        """
        total: Tensors = {}
        norms = []
        for update in updates:  # one client's vector at a time: FAIR's products are large
            vector = released(update)
            norm = math.sqrt(sum(float(v.square().sum()) for v in vector.values()))
            scale = min(1.0, self.clip_norm / max(norm, 1e-12))
            for k, v in vector.items():
                total[k] = total[k] + scale * v if k in total else scale * v
            norms.append(norm)
        generator = torch_generator(dp_random(self.seed, "client-dp", round_number))
        stddev = self.update_noise * self.clip_norm
        noised = {k: v + stddev * torch.randn(v.shape, generator=generator) for k, v in total.items()}
        mean = {k: v / self.expected_clients for k, v in noised.items()}
        self.history.append((self.noise_multiplier, self.sample_rate, 1))
        return mean, norms

    def adapt(self, norms: list[float], round_number: int) -> None:
        """C ← C·exp(−η(b̄ − γ)); b̄ = (Σ(b_k − ½) + noise)/(q·N) + ½ estimates the unclipped share."""
        if not self.adaptive:
            return
        centred = sum((norm <= self.clip_norm) - 0.5 for norm in norms)
        noise = dp_random(self.seed, "clip-count", round_number).gauss(0.0, self.count_stddev)
        unclipped = (centred + noise) / self.expected_clients + 0.5
        self.clip_norm *= math.exp(-self.clip_lr * (unclipped - self.target_quantile))

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history], "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state["history"]]
        self.clip_norm = float(state["clip_norm"])
