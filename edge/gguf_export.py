"""``fedtune export RUN --format gguf``: the run's LoRA adapter as a llama.cpp GGUF adapter.

llama.cpp users run ``llama-cli -m base.gguf --lora adapter.gguf``. The base is the GGUF
file the model came from (SmolLM2 ships as one, and training used exactly its dequantized
weights), copied as ``base.gguf``. The adapter is written with the ``gguf`` package's writer
in the layout llama.cpp's loader expects (``src/llama-adapter.cpp``): ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for every adapted weight
``<gguf name>.lora_a`` (peft's A, r x in) and ``.lora_b`` (B, out x r).

Two conversions make llama.cpp compute what peft computes:
- llama.cpp scales B·A by ``alpha / r``; peft by its ``scaling`` (alpha / r, or alpha / sqrt(r)
  with rsLoRA), so the file's alpha is ``scaling * r``.
- GGUF stores Llama's q and k projections with their rows permuted for its rotary
  embedding (``convert_hf_to_gguf.py``'s ``permute``); B's rows get the same permutation.
The export then checks every weight as llama.cpp will compute it: the dequantized GGUF base
tensor + alpha/r · B·A against the PyTorch base weight + peft's update, in GGUF's row order.
That catches a wrong tensor name, a base that is not the one trained on, or a missing
permutation; the file's alpha itself is checked by the test, through transformers' GGUF reader
and peft's merge.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from fedtune.core.atomic import staged_dir
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.edge.runtime import MANIFEST, sha256_file
from fedtune.engine.adapters import lora_layers
from fedtune.engine.base_model import gguf_source
from fedtune.engine.checkpoint import load_run_model

BASE_FILE = "base.gguf"
ADAPTER_FILE = "adapter.gguf"
PERMUTED_ROWS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}  # llama's rotary layout


def export_gguf(
    run: RunDir,
    out: Path,
    round_number: int | None = None,
    client: str | None = None,
    tolerance: float = 1e-4,
    echo=print,
) -> dict[str, Any]:
    """Write ``base.gguf``, ``adapter.gguf`` and a manifest into OUT; return the manifest."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    config = run.config()
    base_file = gguf_source(config.model.name) if config.model.task == "causal-lm" else None
    if base_file is None:
        raise UserError(
            f"--format gguf: needs a causal LM whose base is a GGUF file (smollm2-135m); "
            f"{config.model.name} ({config.model.task}) is not (use the default --format onnx)"
        )
    reader = gguf.GGUFReader(base_file)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        raise UserError(f"--format gguf: the base's architecture is {arch!r}; only 'llama' adapters are written")
    echo(f"loading {run.path.name}'s model ({config.model.name})")
    adapter, used_round = load_run_model(run, round_number, client, quantization="none")
    if adapter.has_base_residual:
        raise UserError(
            f"--format gguf: strategy {config.strategy.name} changed the base weights (base_residual.safetensors), "
            "which a GGUF adapter beside the packaged base cannot carry; use the default --format onnx"
        )
    layers = lora_layers(adapter.model, adapter.adapter_name)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, adapter.model.config.num_hidden_layers)
    base = {t.name: t for t in reader.tensors}
    scalings = {round(layer.scaling[adapter.adapter_name], 9) for layer in layers.values()}
    ranks = {layer.r[adapter.adapter_name] for layer in layers.values()}
    if len(scalings) != 1 or len(ranks) != 1:
        raise UserError("--format gguf: llama.cpp takes one alpha per adapter; this adapter's layers differ in rank or scale")
    scaling, rank = scalings.pop(), ranks.pop()
    alpha = scaling * rank  # llama.cpp multiplies B·A by alpha / rank

    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    worst = 0.0
    for module, layer in layers.items():
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None or target not in base:
            raise UserError(f"--format gguf: {module} has no tensor in {base_file.name}")
        a = layer.lora_A[adapter.adapter_name].weight.detach().float()
        b_peft = layer.lora_B[adapter.adapter_name].weight.detach().float()
        b = _gguf_rows(b_peft, module, adapter.model.config)
        merged = _gguf_rows(layer.base_layer.weight.detach().float() + scaling * (b_peft @ a), module, adapter.model.config)
        applied = torch.from_numpy(_dequantized(base[target])) + (alpha / rank) * (b @ a)
        worst = max(worst, float((applied - merged).abs().max()))
        tensors[target] = (a.numpy(), b.numpy())
    echo(f"check: base.gguf + alpha/r·B·A vs the merged PyTorch weights, max |diff| = {worst:.2e} over {len(tensors)} weights")
    if not worst <= tolerance:
        raise UserError(f"export refused: the GGUF adapter differs from PyTorch's merged weights by {worst:.2e} > {tolerance:g}")

    with staged_dir(out) as bundle:
        shutil.copyfile(base_file, bundle / BASE_FILE)
        _write_adapter(bundle / ADAPTER_FILE, arch, alpha, tensors)
        manifest = {
            "format": "gguf",
            "task": config.model.task,
            "base": {"file": BASE_FILE, "from": base_file.name, "architecture": arch},
            "adapter": {"file": ADAPTER_FILE, "rank": rank, "alpha": alpha, "peft_scaling": scaling, "weights": len(tensors)},
            "check": {"max_abs_diff": worst, "tolerance": tolerance},
            "prompt": config.data.prompt,
            "usage": f"llama-cli -m {BASE_FILE} --lora {ADAPTER_FILE}",
            "source": {"run": str(run.path.resolve()), "round": used_round, "client": client, "model": config.model.name},
            "sha256": {name: sha256_file(bundle / name) for name in (BASE_FILE, ADAPTER_FILE)},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    echo(f"gguf: {out} ({(out / ADAPTER_FILE).stat().st_size / 1e6:.2f} MB adapter, {(out / BASE_FILE).stat().st_size / 1e6:.1f} MB base)")
    return manifest


def _write_adapter(path: Path, arch: str, alpha: float, tensors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A llama.cpp LoRA adapter file: each target weight's A and B, and one alpha."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for target, (a, b) in sorted(tensors.items()):
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a, np.float32))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_rows(weight: torch.Tensor, module: str, config: Any) -> torch.Tensor:
    """WEIGHT's rows in GGUF's order: q/k rows permuted as ``convert_hf_to_gguf.py`` permutes them."""
    heads_attr = PERMUTED_ROWS.get(module.rsplit(".", 1)[-1])
    if heads_attr is None:
        return weight
    heads = getattr(config, heads_attr)
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A base tensor as float32 in (out, in) layout."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))
