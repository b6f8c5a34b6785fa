"""LoRA aggregation strategies, one module per method; the registry below is the list of them.

A new method is one module here with its class (name, plan, capabilities, settings, ``combine``)
and one entry in ``STRATEGIES``: everything the rest of fedtune needs to know about a method is
on its class, reached through ``strategy_class``; nothing outside this folder compares names.
"""

from __future__ import annotations

from fedtune.core.config import Config
from fedtune.core.errors import UserError
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
from fedtune.strategies.rolora import RoLoRA
from fedtune.strategies.secure import check_secure_config

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedIT, FfaLora, FedSaLora, LoraFair, FlexLora, HetLora, FLoRA, FedExLora, RoLoRA)
}
DEFAULT = next(iter(STRATEGIES))  # strategy.name when a config names none


def strategy_class(config: Config) -> type[LoraStrategy]:
    """The class of the config's ``strategy.name`` (checked by ``check_config``)."""
    return STRATEGIES[config.strategy.name or DEFAULT]


def personalised(run_name: str) -> bool:
    """Whether the strategy RUN_NAME names keeps per-client tensors; False for anything else that ran
    (``compare``'s centralised baseline)."""
    return run_name in STRATEGIES and STRATEGIES[run_name].personalised()


def check_config(config: Config) -> None:
    """The config's strategy name, its section and the method's own checks; one ``UserError`` line each.

    Every ``strategy.NAME`` section given is checked, not only the chosen one's (a typo there would
    otherwise go unnoticed until someone switches to that method)."""
    name = config.strategy.name or DEFAULT
    if name not in STRATEGIES:
        raise UserError(f"config: strategy.name: unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    moved = {key for cls in STRATEGIES.values() for key in cls.moved_keys}
    for key in config.strategy.model_extra or {}:
        if key in STRATEGIES and STRATEGIES[key].settings is not None:
            STRATEGIES[key].settings_of(config)
        elif key not in moved:
            sections = [n for n, cls in STRATEGIES.items() if cls.settings is not None]
            allowed = ", ".join([*config.strategy.model_fields, *sections])
            raise UserError(f"config: strategy.{key}: unknown key; allowed keys here: {allowed}")
    cls = STRATEGIES[name]
    if config.client.ranks and not cls.plan.per_client_ranks:
        per_client = ", ".join(n for n, c in STRATEGIES.items() if c.plan.per_client_ranks)
        raise UserError(f"client.ranks: strategy {name} trains every client at one rank; per-client ranks need {per_client}")
    cls.check_config(config)
    check_secure_config(config, cls, [n for n, c in STRATEGIES.items() if c.secure_sum])


def with_defaults(config: Config) -> None:
    """Fill in the registry's default name and the chosen method's section, as the resolved config records them."""
    config.strategy.name = name = config.strategy.name or DEFAULT
    cls = STRATEGIES[name]
    if cls.settings is not None:
        setattr(config.strategy, name, cls.settings_of(config).model_dump(mode="json"))
    for key in cls.moved_keys:
        (config.strategy.model_extra or {}).pop(key, None)


def build_strategy(config: Config) -> LoraStrategy | ClientLevelDP:
    """The run's strategy; under ``privacy.mode: client`` wrapped in DP-FedAvg."""
    strategy = strategy_class(config).from_config(config)
    return ClientLevelDP.from_config(strategy, config) if config.privacy.mode == "client" else strategy


__all__ = ["DEFAULT", "STRATEGIES", "ClientLevelDP", "LoraStrategy", "build_strategy", "check_config", "personalised", "strategy_class", "with_defaults"]
