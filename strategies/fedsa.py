"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B private.

The paper finds that A learns general knowledge and B client-specific knowledge, so
clients train both but only A is averaged; each client keeps its own B (and, with
``strategy.head: private``, its own head) across rounds. The coordinator never
receives a B. Each client's model is personalised (global A + own B); the global-only
model is global A with B at its zero init, i.e. the base model plus the shared head.
rsLoRA scaling (``adapter.rslora: true``) gives FedSA-rsLoRA.
"""

from __future__ import annotations

from fedtune.plan import ParameterPlan
from strategies.base import ClientUpdate, LoraStrategy, Tensors
from strategies.fedit import weighted_mean


def fedsa_plan(private_head: bool) -> ParameterPlan:
    head = frozenset({"head"})
    return ParameterPlan(
        trained=frozenset({"lora_A", "lora_B", "head"}),
        sent=frozenset({"lora_A"}) | (frozenset() if private_head else head),
        private=frozenset({"lora_B"}) | (head if private_head else frozenset()),
    )


class FedSaLora(LoraStrategy):
    def __init__(self, *args, private_head: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = fedsa_plan(private_head)

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return weighted_mean([u.tensors for u in updates], [u.num_examples for u in updates])
