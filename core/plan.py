"""Adapter roles and the parameter plan: the contract between a strategy and its clients.

A strategy declares, per role, what clients train, what they send, what they keep
privately across rounds and what stays frozen at its seeded initial value. The plan
travels in every train message, so clients follow it without knowing strategy names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

ROLES = ("lora_A", "lora_B", "head")
RESIDUAL = "base_residual"  # not a plan role: what FLoRA and FedEx-LoRA fold into a LoRA layer's frozen weight


def role_of(name: str) -> str:
    """Role of a peft state-dict tensor name (or of a base residual's name, ``residual_name``)."""
    if name.endswith("." + RESIDUAL):
        return RESIDUAL
    if ".lora_A." in name:
        return "lora_A"
    if ".lora_B." in name:
        return "lora_B"
    return "head"


def residual_name(lora_a_name: str) -> str:
    """The name of the base residual of the LoRA layer whose A factor is LORA_A_NAME: the layer's
    module path (as in the peft model) plus ``.base_residual``."""
    return lora_a_name.split(".lora_A.")[0] + "." + RESIDUAL


@dataclass(frozen=True)
class ParameterPlan:
    trained: frozenset[str]  # roles that receive gradient updates on clients
    sent: frozenset[str]  # roles clients upload (and the server broadcasts back)
    private: frozenset[str] = frozenset()  # roles each client keeps across rounds
    frozen: frozenset[str] = frozenset()  # roles fixed at the shared seeded init
    per_client_ranks: bool = False  # clients may train LoRA factors at ranks of their own (core/ranks.py)

    def __post_init__(self) -> None:
        for group in (self.trained, self.sent, self.private, self.frozen):
            unknown = set(group) - set(ROLES)
            if unknown:
                raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
        if self.frozen & self.trained or self.private & self.sent:
            raise ValueError("a role cannot be both frozen and trained, or both private and sent")

    def to_record(self) -> dict[str, str]:
        record = {f"plan.{k}": ",".join(sorted(getattr(self, k))) for k in ("trained", "sent", "private", "frozen")}
        return {**record, "plan.ranks": "per-client" if self.per_client_ranks else "shared"}

    @classmethod
    def from_record(cls, record: dict) -> ParameterPlan:
        def roles(key: str) -> frozenset[str]:
            text = str(record.get(f"plan.{key}", ""))
            return frozenset(filter(None, text.split(",")))

        per_client = record.get("plan.ranks") == "per-client"
        return cls(roles("trained"), roles("sent"), roles("private"), roles("frozen"), per_client)


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names and fp32 bytes: proves two parties hold identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
