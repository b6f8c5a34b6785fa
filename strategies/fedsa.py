"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B private.

The paper finds that A learns general knowledge and B client-specific knowledge, so
clients train both but only A is averaged; each client keeps its own B (and, with
``strategy.fedsa.head: private``, its own head) across rounds. The coordinator never
receives a B. Each client's model is personalised (global A + own B); the global-only
model is global A with B at its zero init, i.e. the base model plus the shared head.
rsLoRA scaling (``adapter.rslora: true``) gives FedSA-rsLoRA.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from fedtune.core.config import Config, Section
from fedtune.core.plan import ParameterPlan
from fedtune.strategies.base import LoraStrategy


class FedSaSettings(Section):
    """``strategy.fedsa``: what FedSA-LoRA keeps private besides B."""

    head: Literal["shared", "private"] = "shared"


def fedsa_plan(private_head: bool) -> ParameterPlan:
    head = frozenset({"head"})
    return ParameterPlan(
        trained=frozenset({"lora_A", "lora_B", "head"}),
        sent=frozenset({"lora_A"}) | (frozenset() if private_head else head),
        private=frozenset({"lora_B"}) | (head if private_head else frozenset()),
    )


class FedSaLora(LoraStrategy):
    """``combine`` is the base class's weighted mean (or robust statistic) of A and the shared head.

    With ``strategy.robust: trimmed-mean`` / ``median``, the per-coordinate statistic of A is a
    heuristic: each client's A works with its own private B, which the server never sees.
    """

    name = "fedsa"
    secure_sum = True
    plan = fedsa_plan(private_head=False)  # B is private either way; strategy.fedsa.head decides the head
    settings: ClassVar = FedSaSettings
    moved_keys: ClassVar = {"head": "head"}  # strategy.head, from before the strategy had its own section

    def __init__(self, *args, private_head: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = fedsa_plan(private_head)

    @classmethod
    def from_config(cls, config: Config) -> FedSaLora:
        private = cls.settings_of(config).head == "private"
        return cls(**cls.common_settings(config), private_head=private)
