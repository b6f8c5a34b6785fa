"""Client-level DP (DP-FedAvg, McMahan et al. 2018): a wrapper around any strategy.

As Flower's ``DifferentialPrivacyServerSide*Clipping`` wrap ``FedAvg``, ``ClientLevelDP`` wraps a
``LoraStrategy``: it samples the round's clients, and replaces the strategy's aggregation by the
mechanism below on what the strategy says each client releases (``released``), then lets the
strategy finish from the noised mean alone (``combine_released``). The mechanism is
``DpFedAvg``; the wrapper owns it (its accountant, its preflight), as Opacus' PrivacyEngine owns
its accountant.

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

Why not Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers themselves: they skip a
whole round when any reply fails, expect every reply to carry the whole model as a
plain ``ArrayRecord`` (ours carry codec-packed sent tensors or ZO seeds), sample clients
with the strategy's own (seeded) sampler, and do not account.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.core.config import Config
from fedtune.core.dp_accounting import (
    History,
    calibrated_noise,
    dp_random,
    history_epsilon,
    torch_generator,
    utility_warning,
)
from fedtune.core.errors import UserError
from fedtune.core.flower_internals import compute_adaptive_noise_params, log
from fedtune.strategies.base import Aggregate, LoraStrategy
from fedtune.strategies.updates import ClientUpdate, Tensors, decodable, weighted_metrics


@dataclass
class DpFedAvg:
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
    def from_config(cls, config: Config) -> DpFedAvg:
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


class ClientLevelDP(Strategy):
    """DP-FedAvg around STRATEGY: secret Poisson sampling, per-client clipping, noise, accounting."""

    def __init__(self, strategy: LoraStrategy, mechanism: DpFedAvg) -> None:
        self.strategy, self.mechanism = strategy, mechanism

    @classmethod
    def from_config(cls, strategy: LoraStrategy, config: Config) -> ClientLevelDP:
        return cls(strategy, DpFedAvg.from_config(config))

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def plan(self):  # noqa: ANN201 (the wrapped strategy's ParameterPlan)
        return self.strategy.plan

    @property
    def frozen_checksum(self) -> str | None:
        return self.strategy.frozen_checksum

    def preflight(self, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Whether the noise leaves any signal: σ·√(released coordinates) against the expected clients."""
        released = self.strategy.released_coordinates(tensors)
        warning = utility_warning("client", self.mechanism.update_noise, released, self.mechanism.expected_clients)
        return [warning] if warning else []

    def refusal(self) -> str | None:
        return self.mechanism.refusal()

    def privacy_metrics(self) -> dict[str, float | None]:
        return {"epsilon": self.mechanism.epsilon(), "noise_multiplier": self.mechanism.noise_multiplier}

    # -- Flower Message-API hooks --------------------------------------------------------------
    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        self.strategy.prepare(server_round, arrays)
        chosen = self.mechanism.sample(sorted(grid.get_node_ids()), server_round)  # Poisson, secret
        return self.strategy.messages(server_round, chosen, config, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.aggregate(server_round, decodable(replies, self.decode))
        return outcome.arrays, outcome.metrics

    def aggregate(self, server_round: int, accepted: list[ClientUpdate]) -> Aggregate:
        """Clip what each client releases, sum, add noise, average; the strategy combines from that alone
        (no robust bounds: the clip to C with equal weights bounds every client, and a bound relative
        to the others would make one client's release depend on theirs)."""
        inner = self.strategy
        accepted = sorted(accepted, key=lambda u: u.name)
        if len(accepted) < inner.min_clients:
            log(WARNING, "round %d: %d usable replies < min_clients %d; global adapter unchanged",
                server_round, len(accepted), inner.min_clients)  # fmt: skip
            return Aggregate(None, None)
        stats = {"clip_norm": self.mechanism.clip_norm}
        metrics = MetricRecord(weighted_metrics([(u.num_examples, u.metrics) for u in accepted]))
        mean, stats["update_norms"] = self.mechanism.aggregate(inner.released, accepted, server_round)
        new = {**inner.current, **inner.combine_released(inner.broadcast, mean)}
        self.mechanism.adapt(stats["update_norms"], server_round)
        return inner.finite(new, metrics, stats, server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def evaluation_metrics(self, results: list[tuple[int, dict[str, float]]]) -> MetricRecord | None:
        return self.strategy.evaluation_metrics(results)

    def decode(self, content: RecordDict, node: int, name: str) -> ClientUpdate:
        return self.strategy.decode(content, node, name)

    def max_reply_bytes(self, message_type: str) -> int:
        return self.strategy.max_reply_bytes(message_type)

    def state_dict(self) -> dict:
        return {**self.strategy.state_dict(), "privacy": self.mechanism.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)
        if "privacy" in state:
            self.mechanism.load_state_dict(state["privacy"])
