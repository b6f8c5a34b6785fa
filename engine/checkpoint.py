"""Per-round checkpoints: a PEFT adapter directory plus the state needed to resume.

``checkpoints/round-K/`` holds ``adapter_config.json`` + ``adapter_model.safetensors``
(what ``PeftModel.from_pretrained(base, dir)`` loads, head included), for FLoRA and
FedEx-LoRA ``base_residual.safetensors`` (what those strategies folded into the frozen
weights: add it to the base before loading the adapter; fedtune's own loaders do), and
``fedtune.json`` (round, labels, strategy state incl. its sampling RNG). It is written
to a temporary directory and renamed, so a killed coordinator never leaves a torn
checkpoint behind; ``fedtune.json`` is the completeness marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedtune.core.atomic import staged_dir
from fedtune.core.errors import UserError
from fedtune.core.plan import RESIDUAL, role_of
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import AdapterModel, build_adapter_model

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "fedtune.json"
RESIDUAL_FILE = "base_residual.safetensors"  # FLoRA / FedEx-LoRA: per LoRA layer, added to its frozen weight
PRIVATE_FILE = "private.safetensors"  # a client's private tensors (FedSA's B), in its state dir and in a run's clients/


def save_checkpoint(
    run: RunDir, round_number: int, model: AdapterModel, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    target = run.checkpoint(round_number)
    model.load_state(tensors)
    with staged_dir(target) as staging:
        model.model.save_pretrained(staging)
        residual = {name: value.contiguous() for name, value in tensors.items() if role_of(name) == RESIDUAL}
        if residual:
            save_file(residual, str(staging / RESIDUAL_FILE))
        (staging / STATE_FILE).write_text(json.dumps({"round": round_number, "labels": model.labels, **state}) + "\n")
    return target


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter tensors by peft name, base residuals included; fedtune state) of a checkpoint directory."""
    tensors = load_file(str(path / ADAPTER_FILE))
    if (path / RESIDUAL_FILE).is_file():
        tensors |= load_file(str(path / RESIDUAL_FILE))
    return tensors, json.loads((path / STATE_FILE).read_text())


def load_run_model(
    run: RunDir, round_number: int | None = None, client: str | None = None, quantization: str | None = None
) -> tuple[AdapterModel, int]:
    """A run's adapter model at a checkpoint: global, or personalised with a client's private tensors.

    ``quantization`` loads the base differently from training (e.g. ``none``: the
    full-precision base that export merges into); ``None`` keeps the run's setting.
    """
    config = run.config()
    if quantization is not None:
        config.model.quantization = quantization
    path = run.latest_checkpoint(round_number)
    tensors, state = load_checkpoint(path)
    if client is not None:
        private = run.client_dir(client) / PRIVATE_FILE
        if not private.is_file():
            known = sorted(p.name for p in (run.path / "clients").glob("*")) if (run.path / "clients").is_dir() else []
            raise UserError(
                f"--client {client}: no private state in {run.path} (clients with state: {known or 'none'})"
            )
        tensors = {**tensors, **load_file(str(private))}
    if any(role_of(name) == RESIDUAL for name in tensors) and config.model.quantization != "none":
        raise UserError(
            f"--quantization {config.model.quantization}: strategy {config.strategy.name} folded a residual "
            "into this run's base weights, which needs the float base (--quantization none)"
        )
    model = build_adapter_model(config, state["labels"])
    model.load_state(tensors)
    return model, int(state["round"])
