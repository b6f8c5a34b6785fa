"""What strategies with per-client LoRA ranks share: each client its own rank, one global rank R.

The coordinator holds the global factors at ``adapter.r`` = R, the largest rank any client may
use. A client of rank r receives them cut to r (``fedtune.core.ranks.resize``: the first r
components, rescaled for peft's α/r), trains, and replies at rank r with ``info.rank`` = r. The
reply is checked at the rank it declares (1 ≤ r ≤ R, every factor of that rank, nothing else)
and lifted back to R (zero-padded, rescaled) before anything is combined, so a strategy's
``combine`` sees every client in one shape and s(R)·B_k·A_k is exactly client k's product.
The coordinator remembers each node's declared rank and sends it factors of that rank from
then on (before its first reply: rank R, which the client cuts itself), so bytes down follow
the client's rank.

A client's rank is its own say: declaring R only gets it the global model at full rank (every
participant receives the global model anyway) and an update of full rank, whose weight the
usual bounds limit. The norm bound measures a client's update from the broadcast cut to its
rank, lifted to R: where that client really started.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtune.core import wire
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.plan import ParameterPlan, role_of
from fedtune.core.ranks import LoraScale, rank_of, resize, shapes_at_rank
from fedtune.strategies.base import LoraStrategy
from fedtune.strategies.robust import weighted_mean
from fedtune.strategies.updates import ClientUpdate, ReplyError, Tensors, checked_info

PER_CLIENT_RANK_PLAN = ParameterPlan(
    trained=frozenset({"lora_A", "lora_B", "head"}),
    sent=frozenset({"lora_A", "lora_B", "head"}),
    per_client_ranks=True,
)


def head_mean(tensors: list[Tensors], weights: list[float]) -> Tensors:
    """The example-weighted mean of the head tensors (the same shape at every rank)."""
    heads = [n for n in tensors[0] if role_of(n) == "head"]
    return weighted_mean([{n: t[n] for n in heads} for t in tensors], weights) if heads else {}


class PerClientRankStrategy(LoraStrategy):
    """Rank bookkeeping, per-rank broadcasts and reply shapes; ``combine`` is the subclass's."""

    plan = PER_CLIENT_RANK_PLAN

    def __init__(self, *args: Any, scale: LoraScale = LoraScale(16.0), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale  # peft's s(r): moving factors between ranks keeps their product
        self.ranks: dict[int, int] = {}  # node -> the rank its last accepted reply declared

    @classmethod
    def from_config(cls, config: Config) -> PerClientRankStrategy:
        return cls(**cls.common_settings(config), scale=LoraScale.of(config.adapter))

    @classmethod
    def check_config(cls, config: Config) -> None:
        """What needs one shared rank: client-level DP's common broadcast, coordinate-wise statistics, seed replay."""
        super().check_config(config)
        if config.privacy.mode == "client":
            raise UserError(f"strategy.name {cls.name}: not with privacy.mode client yet (clients start from different broadcasts)")
        if config.strategy.robust in ("trimmed-mean", "median"):
            raise UserError(f"strategy.robust {config.strategy.robust}: not with {cls.name}, whose factors differ in rank; use norm-bound or none")
        if config.client.zo_upload == "seeds":  # whatever client.mode says: an agent's --mode zo would upload seeds
            raise UserError(f"client.zo_upload seeds: not with {cls.name} (the coordinator replays seeds from one broadcast); use delta")

    @property
    def rank(self) -> int:
        """R: the rank of the global factors."""
        return rank_of(self.current) or 0

    def at_rank(self, tensors: Mapping[str, Any], rank: int) -> Tensors:
        return resize(tensors, rank, self.scale)

    def payloads(self, nodes: list[int], shared: dict) -> dict[int, dict]:
        """Each node gets the sent tensors at the rank it last declared (R if it has not yet)."""
        sent = {name: self.current[name] for name in self.uploaded_names()}
        encoded = {self.rank: shared}
        for rank in {self.ranks.get(node, self.rank) for node in nodes} - {self.rank}:
            encoded[rank] = wire.encode(self.at_rank(sent, rank), self.compression)
        return {node: encoded[self.ranks.get(node, self.rank)] for node in nodes}

    def expected_shapes(self, info: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
        rank = info.get("rank")
        if not isinstance(rank, int) or not 1 <= rank <= self.rank:
            raise ReplyError(f"'rank' must be an integer between 1 and {self.rank}")
        return shapes_at_rank(super().expected_shapes(info), rank)

    def lifted(self, tensors: Tensors, info: Mapping[str, object]) -> Tensors:
        return self.at_rank(tensors, self.rank)

    def decode(self, content, node: int, name: str) -> ClientUpdate:
        self.expected_shapes(checked_info(content))  # the declared rank, before either upload path
        update = super().decode(content, node, name)
        self.ranks[node] = int(update.info["rank"])
        return update

    def replay_seeds(self, arrays, config) -> Tensors:
        """Seeds are replayed from one broadcast; a client of another rank started elsewhere."""
        raise ReplyError("ZO seed uploads: not with per-client ranks (upload tensors: client.zo_upload delta)")

    def probed_head(self, arrays) -> Tensors:
        """A head-only reply is completed from the broadcast, which a client of another rank did not start from."""
        raise ReplyError(f"'{wire.HEAD_PROBE}': not with per-client ranks")

    def starts(self, updates: list[ClientUpdate]) -> list[Tensors]:
        """Client k started from the broadcast cut to its rank; lifted to R, that is the broadcast
        with the components beyond its rank set to zero."""
        cut = {}
        for rank in {int(u.info["rank"]) for u in updates}:
            cut[rank] = self.at_rank(self.at_rank(self.broadcast, rank), self.rank)
        return [cut[int(u.info["rank"])] for u in updates]
