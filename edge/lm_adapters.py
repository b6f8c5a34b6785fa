"""``fedtune export RUN --clients all`` for causal LMs: one base, an onnxruntime-genai adapter per client.

onnxruntime-genai's model builder, given a peft adapter, writes the LoRA factors as their own
MatMuls beside the base's (``x·Aᵀ·(s·B)ᵀ`` added to ``x·Wᵀ``). Here those factor weights are
turned into graph inputs, so ``model.onnx`` holds the base once, and each client's factors
go into ``adapters/<client>.onnx_adapter`` (onnxruntime's adapter format). At run time the
generator is given a client's adapter (``og.Adapters``, ``set_active_adapter``); the model
and its base stay loaded.

The builder's names for the factors are found by value, not guessed: the model is built
from distinct random factors and each builder weight is matched to the peft factor it
equals (A transposed, or B scaled and transposed). Each client's ONNX logits are then
checked against PyTorch's personalised model on the check examples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fedtune.core.atomic import staged_dir
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.edge.adapters import GLOBAL, client_adapters
from fedtune.edge.export import MANIFEST, manifest_record
from fedtune.edge.genai_build import build_decoder
from fedtune.edge.parity import check_rows, max_abs_diff, ort_outputs, torch_outputs
from fedtune.edge.runtime import ADAPTER_DIR, GENAI_CONFIG, LM_ADAPTER_SUFFIX
from fedtune.engine.adapters import AdapterModel, lora_layers
from fedtune.engine.base_model import model_dir
from fedtune.engine.data import ExampleSet, TaskSpec, encode


def export_lm_adapter_bundle(
    run: RunDir,
    out: Path,
    clients: list[str] | None = None,
    round_number: int | None = None,
    check_data: str | None = None,
    check_examples: int = 500,
    tolerance: float = 1e-3,
    echo=print,
) -> dict[str, Any]:
    """Write a causal LM's base decoder plus one onnxruntime-genai adapter per client of CLIENTS (None: all)."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    config = run.config()
    adapter, used_round, every = client_adapters(run, clients, round_number, echo)
    layers = lora_layers(adapter.model, adapter.adapter_name)
    if not Path(model_dir(config.model.name)).is_dir():
        raise UserError(f"--clients: {config.model.name} is not a local model directory; onnxruntime-genai's builder needs one")
    checks = encode(check_rows(config, check_data, check_examples), TaskSpec.from_config(config), adapter.tokenizer, "check data")
    staging = out.with_name(f".{out.name}.work")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "built").mkdir(parents=True)
    try:
        manifest = _write_bundle(run, out, staging, adapter, used_round, every, layers, checks, tolerance, echo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sizes = manifest["sizes"]["files"]
    echo(f"bundle: {out} ({(sizes['model.onnx'] + sizes['model.onnx.data']) / 1e6:.1f} MB base, {len(every)} adapters {sum(v for k, v in sizes.items() if k.startswith(ADAPTER_DIR)) / 1e6:.2f} MB in all)")
    return manifest


def _write_bundle(
    run: RunDir,
    out: Path,
    staging: Path,
    adapter: AdapterModel,
    used_round: int,
    every: dict[str, dict[str, torch.Tensor]],
    layers: dict,
    checks: ExampleSet,
    tolerance: float,
    echo,  # noqa: ANN001
) -> dict[str, Any]:
    """Build, check every client through plain onnxruntime, write OUT, check again through the generator."""
    config = run.config()
    echo(f"building {config.model.name} with onnxruntime-genai, its {2 * len(layers)} LoRA factors as inputs, for {len(every)} adapters")
    factors = _build_with_factor_inputs(adapter, layers, config.model.name, staging)
    model_file = staging / "built" / "model.onnx"
    parity, arrays = {}, {}
    for client, tensors in every.items():
        adapter.load_state(tensors)
        arrays[client] = {name: value(layers) for name, value in factors.items()}
        parity[client] = max_abs_diff(
            torch_outputs(adapter.model, checks), ort_outputs(model_file, checks, adapter.model, arrays[client])
        )
        if not parity[client] <= tolerance:
            raise UserError(f"export refused: client {client}'s ONNX logits differ from PyTorch by {parity[client]:.2e} > tolerance {tolerance:g}")
    echo(f"parity: max |onnxruntime - pytorch| = {max(parity.values()):.2e} over {len(every)} adapters, {len(checks)} examples each")
    with staged_dir(out) as bundle:
        for file in ("model.onnx", "model.onnx.data", GENAI_CONFIG):
            shutil.copyfile(staging / "built" / file, bundle / file)
        (bundle / ADAPTER_DIR).mkdir()
        files = [f"{ADAPTER_DIR}/{client}{LM_ADAPTER_SUFFIX}" for client in every]
        for client, file in zip(every, files):
            _write_onnx_adapter(arrays[client], bundle / file)
        adapter.tokenizer.save_pretrained(bundle)
        manifest = manifest_record(
            bundle,
            config,
            adapter,
            source={"run": str(run.path.resolve()), "round": used_round, "client": None},
            quantization={"mode": "none", "kept_full_precision": [], "method": "none (fp32; LoRA factors unmerged)"},
            parity={"fp32_max_abs_diff": max(parity.values()), "per_client": parity, "tolerance": tolerance, "examples": len(checks)},
            gate={},
            extra_files=[GENAI_CONFIG, *files],
        )
        manifest["adapters"] = {"format": "onnx_adapter", "inputs": sorted(factors), "clients": list(every), "default": GLOBAL}
        generated = _generator_parity(bundle, every, adapter, checks)
        echo(f"parity through onnxruntime-genai's generator and adapters: max |difference| = {max(generated.values()):.2e}")
        if not max(generated.values()) <= tolerance:
            raise UserError(f"export refused: onnxruntime-genai's logits differ from PyTorch by {max(generated.values()):.2e} > tolerance {tolerance:g}")
        manifest["parity"]["generator_per_client"] = generated
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _build_with_factor_inputs(adapter: AdapterModel, layers: dict, base_name: str, staging: Path) -> dict:
    """Build the model with the adapter unmerged; return {graph input name: how to compute it from the layers}."""
    saved = adapter.state()
    generator = torch.Generator().manual_seed(0)
    adapter.load_state({name: torch.randn(value.shape, generator=generator) for name, value in saved.items()})
    name = adapter.adapter_name
    candidates = {}
    for module, layer in layers.items():
        a = layer.lora_A[name].weight.detach().float()
        scaled_b = layer.scaling[name] * layer.lora_B[name].weight.detach().float()
        candidates[(module, "A")] = a.T.numpy().copy()  # a copy: the live parameters are restored below
        candidates[(module, "B")] = scaled_b.T.numpy().copy()
    adapter.model.save_pretrained(staging / "peft")
    build_decoder(Path(model_dir(base_name)), staging / "built", staging, adapter=staging / "peft")
    adapter.load_state(saved)

    path = staging / "built" / "model.onnx"
    model = onnx.load(str(path))
    factors, moved, matched = {}, [], set()
    for init in model.graph.initializer:
        if "lora" not in init.name:
            continue
        values = onnx.numpy_helper.to_array(init)
        match = [key for key, known in candidates.items() if known.shape == values.shape and np.allclose(known, values, rtol=0, atol=1e-6)]
        if len(match) != 1:
            raise RuntimeError(f"export: the builder's LoRA weight {init.name} matches {len(match)} peft factors")
        module, role = match[0]
        matched.add(match[0])
        factors[init.name] = _factor(module, role, name)
        moved.append(init)
    if matched != set(candidates) or len(factors) != len(candidates):
        raise RuntimeError(f"export: the builder's {len(factors)} LoRA weights do not match the {len(candidates)} peft factors one to one")
    for init in moved:
        model.graph.initializer.remove(init)
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    (staging / "built" / "model.onnx.data").unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    return factors


def _factor(module: str, role: str, name: str):  # noqa: ANN202
    """The array a graph input takes for the adapter now loaded in the layers (A: Aᵀ; B: (s·B)ᵀ)."""

    def value(layers: dict) -> np.ndarray:
        layer = layers[module]
        if role == "A":  # copies: the live parameters change with the next client
            return np.array(layer.lora_A[name].weight.detach().float().T.numpy(), copy=True, order="C")
        return np.array((layer.scaling[name] * layer.lora_B[name].weight.detach().float()).T.numpy(), copy=True, order="C")

    return value


def _write_onnx_adapter(arrays: dict[str, np.ndarray], path: Path) -> None:
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in arrays.items()})
    adapter.export_adapter(str(path))


def _generator_parity(bundle: Path, every: dict, adapter: AdapterModel, checks: ExampleSet) -> dict[str, float]:
    """Per client: onnxruntime-genai's next-token logits, through the written adapter file and
    ``set_active_adapter``, against PyTorch's, after the first check example's prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    loaded = og.Adapters(model)
    example = checks.examples[0]  # its prompt: the generator takes pad (= EOS) tokens for padding
    ids = [int(t) for t in example["input_ids"][: example.get("prompt_len", len(example["input_ids"]))]]
    differences = {}
    for client, tensors in every.items():
        loaded.load(str(bundle / ADAPTER_DIR / f"{client}{LM_ADAPTER_SUFFIX}"), client)
        adapter.load_state(tensors)
        with torch.no_grad():
            expected = adapter.model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(model, params)
        generator.set_active_adapter(loaded, client)
        generator.append_tokens([ids])
        differences[client] = float(np.abs(generator.get_logits()[0, -1] - expected).max())
    return differences
