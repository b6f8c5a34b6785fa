"""Memory a training step needs, and the mode that fits a budget (``client.mode: auto``).

The backprop estimate is measured, not guessed: one forward pass on a single real
example records the bytes autograd saves for the backward pass (parameters excluded,
shared storage counted once); that scales with tokens to the client's batch size times
its longest example, plus gradients and AdamW's two moments for the trained tensors.
A ZO step keeps nothing for backward: its extra memory is one forward's transient
peak (about three of its largest activations: logits, their float copy, the softmax)
and one copy of the trained tensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.core.config import ClientSection
from fedtune.core.plan import ROLES
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import ExampleSet
from fedtune.engine.trainers.base import to_device

MB = 2**20


@dataclass
class Footprint:
    """Bytes: held now (base model, adapter, data), and the estimated total during each step."""

    resident: int
    backprop: int
    zo: int


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def default_budget(device: torch.device) -> int:
    """What this process may use: what it holds plus what the device has free."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) + torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return resident_bytes(device) + int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def estimate(model: AdapterModel, data: ExampleSet, settings: ClientSection) -> Footprint:
    params = model.trainable(ROLES)
    param_storages = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = to_device(next(data.batches(1, random.Random(0))), model.device)
    model.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(**batch).loss  # noqa: B018  (the forward pass is the measurement)
    model.model.eval()
    tokens_measured = batch["input_ids"].numel()
    longest = max(len(example["input_ids"]) for example in data.examples)
    scale = settings.batch_size * longest / tokens_measured
    trained = sum(p.numel() * p.element_size() for p in params.values())
    transient = int(3 * max(saved.values(), default=0) * scale)
    resident = resident_bytes(model.device)
    return Footprint(
        resident=resident,
        backprop=resident + int(sum(saved.values()) * scale) + 3 * trained + transient,
        zo=resident + transient + trained,
    )


def rank_bytes(model: AdapterModel, data: ExampleSet, settings: ClientSection) -> int:
    """What one more LoRA rank adds to a backprop step: per LoRA layer d_in + d_out numbers held four
    times (value, gradient, AdamW's two moments) and the saved x·Aᵀ of every token of the batch."""
    a_names = model.names(["lora_A"])
    rank = int(model.params[a_names[0]].shape[0]) if a_names else 1
    numbers = sum(model.params[n].numel() for n in model.names(["lora_A", "lora_B"])) // rank
    longest = max(len(example["input_ids"]) for example in data.examples)
    return 4 * 4 * numbers + 4 * len(a_names) * settings.batch_size * longest


def choose_rank(footprint: Footprint, rank: int, per_rank: int, budget: int) -> tuple[int, str]:
    """``(rank, reason)``: the largest of RANK and the powers of two below it whose backprop step fits
    BUDGET, from FOOTPRINT measured at RANK and PER_RANK bytes (``rank_bytes``); rank 1 if none fits."""
    candidates = sorted({rank} | {2**k for k in range(rank.bit_length()) if 2**k < rank}, reverse=True)
    for candidate in candidates:
        need = footprint.backprop - (rank - candidate) * per_rank
        if need <= budget:
            return candidate, f"rank {candidate}: backprop step ~{need / MB:.0f} MB fits the budget of {budget / MB:.0f} MB"
    need = footprint.backprop - (rank - 1) * per_rank
    return 1, f"rank 1: backprop step ~{need / MB:.0f} MB does not fit the budget of {budget / MB:.0f} MB even so (--mode zo or auto would)"


def choose_mode(footprint: Footprint, budget: int) -> tuple[str, str]:
    """``(mode, reason)``: backprop when its step fits ``budget``, else zo."""
    need = f"backprop step ~{footprint.backprop / MB:.0f} MB, zo step ~{footprint.zo / MB:.0f} MB (estimated)"
    if footprint.backprop <= budget:
        return "backprop", f"{need}; budget {budget / MB:.0f} MB: backprop fits"
    warning = "" if footprint.zo <= budget else "; even zo may not fit"
    return "zo", f"{need}; budget {budget / MB:.0f} MB: backprop does not fit, using zo{warning}"
