"""What every LoRA strategy shares: the round's math, its capabilities, Flower's Message-API hooks.

A strategy is one class. It sets ``name`` and ``plan`` (which adapter roles clients train,
send, keep private, keep frozen), says what it can do (classmethods the config check, the DP
preflight and the CLI ask), and implements ``combine``: pure tensor math from the clients'
sent tensors to the new global values. Around it, elsewhere: reply checking and decoding
(strategies/updates.py), robust aggregation, a step the strategy is given
(strategies/robust.py), client-level DP, a wrapper around any strategy
(strategies/client_dp.py), and the federation's session, whose is which name and which
replies a round accepted (coordinator/session.py).

Message format. Train/evaluate messages carry ``arrays`` + ``layout`` (the broadcast tensors,
peft-named, packed by core/wire.py with the run's codec), ``config`` (round, codec, the round's
plan) and whatever ``extra_records`` the strategy adds (FLoRA's and FedEx-LoRA's base residual).
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.core import wire
from fedtune.core.config import Config, Section, validate_section
from fedtune.core.errors import UserError
from fedtune.core.flower_internals import log
from fedtune.core.plan import ParameterPlan, checksum, role_of
from fedtune.strategies import updates
from fedtune.strategies.robust import RobustSettings, aggregate_tensors, bound_updates, cap_weights
from fedtune.strategies.updates import ClientUpdate, ReplyRules, Tensors, weighted_metrics


@dataclass
class Aggregate:
    """A round's outcome: the new global tensors (None: the previous model stays), the clients'
    weighted metrics, and what the round's record says about how it was combined."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    stats: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why there is no new model, when it is the aggregate's own fault


class LoraStrategy(ReplyRules, Strategy):
    """Base of fedtune's strategies (a Flower Message-API ``Strategy``); what its replies must be: ``ReplyRules``."""

    name: ClassVar[str]  # strategy.name, and the key of the registry
    plan: ClassVar[ParameterPlan]  # the roles clients train, send, keep private, keep frozen
    base_residual: ClassVar[bool] = False  # folds a residual into the frozen base (strategies/base_residual.py)
    settings: ClassVar[type[Section] | None] = None  # the model of its own config section, strategy.NAME
    moved_keys: ClassVar[dict[str, str]] = {}  # older flat keys strategy.KEY -> the key of its section they became
    secure_sum: ClassVar[bool] = False  # its round is the weighted mean of the clients' changes (strategies/secure.py)
    secure_refusal: ClassVar[str] = ""  # why a secure sum cannot serve it, when it cannot

    def __init__(
        self,
        fraction: float = 1.0,
        min_clients: int = 2,
        sample_seed: int = 0,
        compression: str = "none",
        robust: RobustSettings = RobustSettings(),
        seed_limits: tuple[int, int] | None = None,
    ) -> None:
        self.fraction, self.min_clients, self.compression = fraction, min_clients, compression
        self.robust = robust  # bounds and statistic of ``strategy.robust``
        self.seed_limits = seed_limits  # client.zo_upload seeds: (ZO steps, samples) a reply may hold; None: no seeds
        self.rng = random.Random(sample_seed)  # client sampling, checkpointed for resume
        self.round = 0  # the round in progress
        self.current: Tensors = {}  # its global tensors
        self.broadcast: Tensors = {}  # this round's sent tensors as the clients decoded them (codec included)
        self.frozen_checksum: str | None = None

    # -- what the method is and can do -------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> LoraStrategy:
        """The strategy of a resolved config: the federation's settings, then ``strategy.NAME``'s."""
        return cls(**cls.common_settings(config))

    @staticmethod
    def common_settings(config: Config) -> dict[str, Any]:
        fed, client = config.federation, config.client
        seeds = (client.zo_steps or client.local_steps, client.zo_samples) if client.zo_upload == "seeds" else None
        return {
            "fraction": fed.fraction,
            "min_clients": fed.min_clients,
            "sample_seed": config.seed,
            "compression": fed.compression,
            "robust": RobustSettings.from_config(config.strategy),
            "seed_limits": seeds,
        }

    @classmethod
    def settings_of(cls, config: Config) -> Section:
        """``strategy.NAME``, checked (one ``UserError`` line per problem); older flat keys moved into it."""
        extras = config.strategy.model_extra or {}
        raw = {new: extras[old] for old, new in cls.moved_keys.items() if old in extras}
        return validate_section(cls.settings, raw | config.strategy.section(cls.name), f"strategy.{cls.name}")

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Refuse, with one ``UserError`` line, what this method cannot run (before anything heavy starts)."""
        if config.client.ranks and max(config.client.ranks) > config.adapter.r:
            raise UserError(f"client.ranks: {max(config.client.ranks)} exceeds adapter.r ({config.adapter.r}), the global rank")

    @classmethod
    def personalised(cls) -> bool:
        """Whether each client's model is its own (it keeps tensors the coordinator never sees)."""
        return bool(cls.plan.private)

    @classmethod
    def released_coordinates(cls, tensors: Mapping[str, torch.Tensor]) -> int:
        """How many numbers one client releases under client-level DP: its sent tensors' (the noise scales with it)."""
        return sum(value.numel() for name, value in tensors.items() if role_of(name) in cls.plan.sent)

    def plan_for(self, server_round: int) -> ParameterPlan:
        """The plan of one round (a method that alternates what it trains changes it)."""
        return self.plan

    def broadcast_roles(self, server_round: int) -> frozenset[str]:
        """The roles a round's messages carry down: what its clients send back, unless a method needs more."""
        return self.plan_for(server_round).sent

    # -- the round's math ----------------------------------------------------------------------
    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """New global values of the sent tensors: the example-weighted mean of what clients send, or
        the coordinate-wise statistic that ``strategy.robust`` names (strategies/robust.py)."""
        return aggregate_tensors([u.tensors for u in updates], [u.num_examples for u in updates], self.robust)

    def starts(self, updates: list[ClientUpdate]) -> list[Tensors]:
        """Where each client started this round (what its update is measured from): the broadcast."""
        return [self.broadcast] * len(updates)

    def released(self, update: ClientUpdate) -> Tensors:
        """What client-level DP clips and noises for one client: its change from the broadcast."""
        return {k: v - self.broadcast[k].float() for k, v in update.tensors.items()}

    def combine_released(self, start: Tensors, mean: Tensors) -> Tensors:
        """New global values from the noised mean of ``released`` (post-processing only)."""
        return {k: start[k].float() + mean[k] for k in start if k in mean}

    def aggregate(self, server_round: int, accepted: list[ClientUpdate]) -> Aggregate:
        """The round's new global tensors from the accepted updates: bounds (``robust``), then ``combine``."""
        accepted = sorted(accepted, key=lambda u: u.name)  # arrival order must not change the sums
        if len(accepted) < self.min_clients:
            log(WARNING, "round %d: %d usable replies < min_clients %d; global adapter unchanged",
                server_round, len(accepted), self.min_clients)  # fmt: skip
            return Aggregate(None, None)
        stats = {}
        if self.robust.bounded:
            counts = [u.num_examples for u in accepted]
            bounded = bound_updates([u.tensors for u in accepted], counts, self.starts(accepted), self.robust)
            stats = {"robust_clipped": bounded.clipped, "robust_capped": bounded.capped}
            accepted = [replace(u, tensors=t, num_examples=w) for u, t, w in zip(accepted, bounded.tensors, bounded.weights)]
        metrics = MetricRecord(weighted_metrics([(u.num_examples, u.metrics) for u in accepted]))
        return self.finite({**self.current, **self.combine(self.current, accepted)}, metrics, stats, server_round)

    def finite(self, new: Tensors, metrics: MetricRecord, stats: dict[str, Any], server_round: int) -> Aggregate:
        """The new global tensors, or none when any is not finite: the previous model stays."""
        if all(torch.isfinite(value).all() for value in new.values()):
            return Aggregate(ArrayRecord(new), metrics, stats)
        log(WARNING, "round %d: the aggregate is not finite; global adapter unchanged", server_round)
        return Aggregate(None, None, stats, "aggregate: non-finite result")

    def evaluation_metrics(self, results: list[tuple[int, dict[str, float]]]) -> MetricRecord | None:
        """The clients' weighted evaluation metrics, each count bounded as train weights are."""
        results = [(count, metrics) for count, metrics in results if count > 0]  # no held-out examples: nothing
        if results and self.robust.bounded:  # one client's count must not decide the published client metrics
            counts, _ = cap_weights([count for count, _ in results], self.robust.max_weight_ratio)
            results = [(count, metrics) for count, (_, metrics) in zip(counts, results)]
        return MetricRecord(weighted_metrics(results)) if results else None

    # -- Flower Message-API hooks --------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── %s: fraction %.2f, min clients %d", type(self).__name__, self.fraction, self.min_clients)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        self.prepare(server_round, arrays)
        return self.messages(server_round, self.sample(sorted(grid.get_node_ids())), config, MessageType.TRAIN)

    def prepare(self, server_round: int, arrays: ArrayRecord) -> None:
        """Hold the round's global tensors (and the checksum of what stays frozen at its seeded init)."""
        self.round, self.current, frozen = server_round, arrays.to_torch_state_dict(), self.plan_for(server_round).frozen
        self.frozen_checksum = checksum({k: v for k, v in self.current.items() if role_of(k) in frozen}) if frozen else None

    def sample(self, nodes: list[int]) -> list[int]:
        """``federation.fraction`` of the nodes, at least ``min_clients``, with the run's seeded sampler."""
        wanted = max(self.min_clients, math.ceil(self.fraction * len(nodes)))
        return self.rng.sample(nodes, min(wanted, len(nodes)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook, without a session: every decodable reply counts (coordinator/session.py adds names)."""
        outcome = self.aggregate(server_round, updates.decodable(replies, self.decode))
        return outcome.arrays, outcome.metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        self.current = arrays.to_torch_state_dict()
        return self.messages(server_round, self.sample(sorted(grid.get_node_ids())), config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        results = []
        for reply in replies:
            try:
                results.append(updates.decode_evaluation(reply.content))
            except Exception as err:  # an error reply, or a malformed one: not counted
                log(WARNING, "round %d: evaluate reply not counted: %s", server_round, updates.fault(err))
        return self.evaluation_metrics(results)

    def messages(self, server_round: int, nodes: list[int], config: ConfigRecord, kind: str) -> list[Message]:
        """The round's message to each of NODES: the broadcast, the round's plan, any extra records."""
        plan = self.plan_for(server_round)
        record = ConfigRecord({**dict(config), "round": server_round, "compression": self.compression, **plan.to_record()})
        roles = self.broadcast_roles(server_round)
        shared = wire.encode({name: value for name, value in self.current.items() if role_of(name) in roles}, self.compression)
        payloads, extra = self.payloads(nodes, shared), self.extra_records()
        if kind == MessageType.TRAIN:
            self.broadcast = wire.decode(**shared)  # the codec's rounding included: clients start here
        nonce = secrets.token_hex(16)  # in every record: no one can compute, and so pre-register, the round's objects
        return [
            Message(content=wire.sealed({**payloads[node], **extra, "config": record}, nonce), message_type=kind, dst_node_id=node)
            for node in nodes
        ]

    def payloads(self, nodes: list[int], shared: dict) -> dict[int, dict]:
        """What each chosen node receives: the SHARED encoding of the sent tensors, for every node."""
        return dict.fromkeys(nodes, shared)

    def extra_records(self) -> dict[str, Any]:
        """Records every message of the round carries beside the sent tensors (none here)."""
        return {}

    # -- state that must survive a coordinator restart ----------------------------------------
    def refusal(self) -> str | None:
        """Why the next round must not run (a privacy budget, under client-level DP), else None."""
        return None

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

