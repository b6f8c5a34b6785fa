"""LoRA aggregation strategies, one module per method; ``strategy.name`` picks one."""

from __future__ import annotations

from fedtune.config import Config
from strategies.base import LoraStrategy
from strategies.fair import LoraFair, SolverSettings
from strategies.fedit import FedIT
from strategies.fedsa import FedSaLora
from strategies.ffa import FfaLora
from strategies.privacy import ClientLevelDP
from strategies.robust import RobustSettings

STRATEGIES: dict[str, type[LoraStrategy]] = {"fedit": FedIT, "ffa": FfaLora, "fedsa": FedSaLora, "fair": LoraFair}


def build_strategy(config: Config) -> LoraStrategy:
    common = {
        "fraction": config.federation.fraction,
        "min_clients": config.federation.min_clients,
        "sample_seed": config.seed,
        "compression": config.federation.compression,
    }
    name = config.strategy.name
    if name == "fedsa":
        strategy = FedSaLora(**common, private_head=config.strategy.head == "private")
    elif name == "fair":
        settings = SolverSettings(lam=config.strategy.fair_lambda, max_steps=config.strategy.fair_steps)
        strategy = LoraFair(**common, settings=settings)
    else:
        strategy = STRATEGIES[name](**common)
    settings = config.strategy
    strategy.robust = RobustSettings(
        settings.robust, settings.max_weight_ratio, settings.norm_bound, settings.trim_fraction
    )  # under client-level DP the bounds are not applied (its clip bounds every client)
    if config.privacy.mode == "client":
        strategy.privacy = ClientLevelDP.from_config(config)
    strategy.budget_replies = config.privacy.mode == "sample"
    return strategy
