"""LoRA aggregation strategies, one module per method; ``strategy.name`` picks one."""

from __future__ import annotations

from fedtune.config import Config
from fedtune.strategies.base import LoraStrategy
from fedtune.strategies.client_dp import ClientLevelDP
from fedtune.strategies.fair import LoraFair
from fedtune.strategies.fedex import FedExLora
from fedtune.strategies.fedit import FedIT
from fedtune.strategies.fedsa import FedSaLora
from fedtune.strategies.ffa import FfaLora
from fedtune.strategies.flexlora import FlexLora
from fedtune.strategies.flora import FLoRA
from fedtune.strategies.hetlora import HetLora
from fedtune.strategies.robust import RobustSettings

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedIT, FfaLora, FedSaLora, LoraFair, FlexLora, HetLora, FLoRA, FedExLora)
}


def keeps_private_tensors(name: str) -> bool:
    """Whether a strategy's clients keep tensors of their own (their models are personalised);
    False for anything else that ran (``compare``'s centralised baseline)."""
    strategy = STRATEGIES.get(name)
    return strategy is not None and bool(strategy.plan.private)


def build_strategy(config: Config) -> LoraStrategy:
    common = {
        "fraction": config.federation.fraction,
        "min_clients": config.federation.min_clients,
        "sample_seed": config.seed,
        "compression": config.federation.compression,
    }
    strategy = STRATEGIES[config.strategy.name].from_config(config, **common)
    settings = config.strategy
    strategy.robust = RobustSettings(
        settings.robust, settings.max_weight_ratio, settings.norm_bound, settings.trim_fraction
    )  # under client-level DP the bounds are not applied (its clip bounds every client)
    if config.privacy.mode == "client":
        strategy.privacy = ClientLevelDP.from_config(config)
    strategy.budget_replies = config.privacy.mode == "sample"
    if config.client.zo_upload == "seeds":  # the only runs whose replies may be seeds, as many as its ZO clients make
        strategy.seed_limits = (config.client.zo_steps or config.client.local_steps, config.client.zo_samples)
    return strategy
