"""A peft LoRA model whose adapter tensors are addressed by peft name and grouped by role.

Tensor names are exactly those of ``get_peft_model_state_dict`` (``...lora_A.weight``,
``...lora_B.weight``, ``...classifier.weight``), so what travels between clients and
coordinator is what a PEFT adapter directory stores. Roles (``lora_A``, ``lora_B``,
``head``) are what strategies speak about: which are trained, sent, private, frozen.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.plan import RESIDUAL, ROLES, residual_name, role_of
from fedtune.engine.base_model import head_module_names, load_base_model, load_tokenizer, pick_device


@dataclass
class AdapterModel:
    """A base model with one LoRA adapter (and task head), plus name -> parameter maps."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: str
    labels: list[str]
    device: torch.device
    params: dict[str, torch.nn.Parameter]  # peft state-dict name -> live parameter
    quantization: str = "none"  # how the frozen base is stored (model.quantization)
    adapter_name: str = "default"  # the peft adapter these params belong to (one per rank, see with_rank)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # residual name -> the weight as loaded

    def activate(self) -> None:
        """Make this adapter the one the shared peft model runs (a no-op with a single adapter)."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)

    def names(self, roles: Iterable[str]) -> list[str]:
        wanted = set(roles)
        return [name for name in self.params if role_of(name) in wanted]

    def state(self, roles: Iterable[str] = ROLES) -> dict[str, torch.Tensor]:
        """A CPU copy of the adapter tensors of ``roles``."""
        return {name: self.params[name].detach().to("cpu", copy=True) for name in self.names(roles)}

    @torch.no_grad()
    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the live parameters; names and shapes must match exactly.
        Base residuals among them (FLoRA, FedEx-LoRA) go into the frozen weights (``set_base_residual``)."""
        residual = {name: value for name, value in tensors.items() if role_of(name) == RESIDUAL}
        if residual:
            self.set_base_residual(residual)
        for name, value in tensors.items():
            if name in residual:
                continue
            param = self.params[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
            param.copy_(torch.as_tensor(value, dtype=param.dtype))

    @property
    def has_base_residual(self) -> bool:
        """Whether some frozen weight differs from the base model as loaded (a residual was set)."""
        return bool(self.base_weights)

    @torch.no_grad()
    def set_base_residual(self, residual: Mapping[str, torch.Tensor]) -> None:
        """Every LoRA layer's frozen weight becomes its loaded value plus RESIDUAL's tensor for it (its
        loaded value when RESIDUAL has none): where FLoRA and FedEx-LoRA keep what the factors cannot.
        The loaded weights are kept aside the first time, so each call sets, never accumulates;
        ``with_rank`` copies share ``base_weights`` (one dict, like the one base model they share)."""
        if not residual and not self.base_weights:
            return
        layers = self.residual_layers()
        unknown = sorted(set(residual) - set(layers))
        if unknown:
            raise ValueError(f"base residual for a layer this model does not adapt: {unknown[0]}")
        for name, weight in layers.items():
            if not weight.dtype.is_floating_point:
                raise ValueError(f"{name}: the base weight is quantized ({weight.dtype}); a residual needs a float base")
            original = self.base_weights.setdefault(name, weight.detach().clone())
            value = residual.get(name)
            if value is None:
                weight.copy_(original)
                continue
            if tuple(value.shape) != tuple(weight.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(weight.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: the base residual is not finite")
            weight.copy_((original.float() + value.to(weight.device, torch.float32)).to(weight.dtype))

    def residual_layers(self) -> dict[str, torch.Tensor]:
        """Residual name -> the frozen weight of that LoRA layer as (d_out, d_in), like B·A: a transposed
        view for layers that store (d_in, d_out) (GPT-2's Conv1D, peft's ``fan_in_fan_out``)."""
        layers = {}
        for name in self.names(["lora_A"]):
            module = self.model.get_submodule(name.split(".lora_A.")[0])
            weight = module.get_base_layer().weight
            layers[residual_name(name)] = weight.T if getattr(module, "fan_in_fan_out", False) else weight
        return layers

    def trainable(self, roles: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        """Make exactly ``roles`` trainable and return those parameters by name."""
        chosen = self.names(roles)
        for name, param in self.params.items():
            param.requires_grad_(name in chosen)
        return {name: self.params[name] for name in chosen}


def build_adapter_model(config: Config, labels: list[str], rank: int | None = None) -> AdapterModel:
    """Load the base model, wrap it with LoRA at RANK (the run's ``adapter.r`` by default; a client may
    train at a rank of its own) and a head, and set seeded initial values."""
    device = pick_device(config.model.device)
    num_labels = len(labels) if config.model.task == "classification" else 0
    base = load_base_model(config.model.name, config.model.task, num_labels, device, config.model.quantization)
    heads = head_module_names(base) if config.model.task == "classification" else None
    model = get_peft_model(base, _lora_config(config, heads, rank or config.adapter.r))
    model.eval()  # trainers switch to train mode for their steps and back
    adapter = AdapterModel(
        model=model,
        tokenizer=load_tokenizer(config.model.name),
        task=config.model.task,
        labels=labels,
        device=device,
        params=_params_by_state_name(model),
        quantization=config.model.quantization,
    )
    adapter.load_state(initial_state(adapter.model, config.seed, adapter.params))
    return adapter


def with_rank(adapter: AdapterModel, config: Config, rank: int) -> AdapterModel:
    """Another LoRA adapter of RANK on ADAPTER's base model, active, at its seeded init: a process
    serving clients of several ranks loads the base model once."""
    name = f"rank{rank}"
    heads = head_module_names(adapter.model.base_model.model) if adapter.task == "classification" else None
    adapter.model.add_adapter(name, _lora_config(config, heads, rank))
    ranked = replace(adapter, params=_params_by_state_name(adapter.model, name), adapter_name=name)
    ranked.activate()
    ranked.model.eval()
    ranked.load_state(initial_state(ranked.model, config.seed, ranked.params))
    return ranked


def _lora_config(config: Config, heads: list[str] | None, rank: int) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=config.adapter.alpha,
        lora_dropout=config.adapter.dropout,
        target_modules=list(config.adapter.target_modules),
        use_rslora=config.adapter.rslora,
        modules_to_save=heads,
    )


def initial_state(
    model: PreTrainedModel, seed: int, params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Seeded initial adapter values, identical on every machine and device.

    Each tensor gets its own CPU generator seeded from (seed, name), so values do not
    depend on load order, process or device. Initialisers follow peft and transformers:
    A ~ kaiming-uniform(a=sqrt(5)), B = 0, head weights ~ N(0, initializer_range), biases 0.
    """
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    values = {}
    for name, param in params.items():
        generator = torch.Generator().manual_seed(_name_seed(seed, name))
        value = torch.empty(param.shape, dtype=torch.float32)
        role = role_of(name)
        if role == "lora_A":
            value = lora_a_init(seed, name, tuple(param.shape))
        elif role == "lora_B" or value.dim() == 1:
            value.zero_()
        else:
            value.normal_(0.0, std, generator=generator)
        values[name] = value
    return values


def lora_a_init(seed: int | str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """peft's A init, kaiming-uniform(a=√5) on fan_in, drawn from a CPU generator seeded by (SEED, NAME)."""
    bound = 1.0 / math.sqrt(shape[1])
    generator = torch.Generator().manual_seed(_name_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _name_seed(seed: int | str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _params_by_state_name(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """Map ``get_peft_model_state_dict`` names of ADAPTER_NAME to the live parameters they come from."""
    tag = f".{adapter_name}."
    live = {
        name.replace(tag, ".").replace(".modules_to_save", ""): param
        for name, param in model.named_parameters()
        if tag in name and (".lora_" in name or ".modules_to_save." in name)
    }
    expected = list(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = [name for name in expected if name not in live]
    if missing:
        raise RuntimeError(f"cannot map peft state names to parameters: {missing[:3]}")
    return {name: live[name] for name in expected}


def coordinates_by_role(config: Config, labels: list[str]) -> dict[str, int]:
    """How many numbers each adapter role holds, from the model's config alone (meta device:
    no weights are read), for estimates made before anything loads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.engine.base_model import model_dir

    classify = config.model.task == "classification"
    with torch.device("meta"):
        settings = AutoConfig.from_pretrained(model_dir(config.model.name), num_labels=max(len(labels), 1))
        base = (AutoModelForSequenceClassification if classify else AutoModelForCausalLM).from_config(settings)
        lora = LoraConfig(
            r=config.adapter.r,
            target_modules=list(config.adapter.target_modules or []),
            modules_to_save=head_module_names(base) if classify else None,
        )
        model = get_peft_model(base, lora)
    sizes = dict.fromkeys(ROLES, 0)
    for name, param in _params_by_state_name(model).items():
        sizes[role_of(name)] += param.numel()
    return sizes


def lora_layers(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """The LoRA-adapted layers of MODEL by their transformers name (``model.layers.0.self_attn.q_proj``),
    for formats that hold LoRA factors only (GGUF, onnxruntime-genai adapters): refused when the
    adapter also trains whole modules."""
    layers, embeddings = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name.removeprefix("base_model.model.")] = module
        elif isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
            embeddings.append(name)
    if embeddings:
        raise UserError(f"this export holds LoRA factors of linear layers only; the adapter also adapts embeddings ({embeddings[0]})")
    if any(".modules_to_save." in name for name, _ in model.named_parameters()):
        raise UserError("this export holds LoRA factors only; the adapter also trains whole modules (a head)")
    if not layers:
        raise UserError("the model has no LoRA layers to export")
    return layers
