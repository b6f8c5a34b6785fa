"""`fedtune export --format gguf`: a llama.cpp LoRA adapter next to the GGUF base.

llama-cpp-python does not install from wheels here (it compiles llama.cpp), so these tests
check what llama.cpp's loader checks (src/llama-adapter.cpp: general.type, adapter.type,
alpha, paired .lora_a/.lora_b tensors whose shapes fit the base tensors) and the numbers:
the base tensor plus alpha/r · B·A, as llama.cpp applies it, turned back into transformers'
layout with transformers' own GGUF reader, equals the merged PyTorch weight.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from conftest import run_cli
from fedtune.edge.runtime import sha256_file
from fedtune.engine.checkpoint import load_run_model
from test_edge import make_run

LM = {
    "model": {"name": "smollm2-135m", "task": "causal-lm", "max_length": 48},
    "data": {"eval": "synthetic:support/eval", "prompt": "Message: {text}\nIntent:", "response": " {label}"},
}


def _field(reader: gguf.GGUFReader, key: str):  # noqa: ANN202
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value.item()


def test_gguf_adapter_is_what_llama_cpp_loads_and_applies_pytorchs_update(tmp_path):
    # rsLoRA: peft scales by alpha / sqrt(r), llama.cpp by alpha / r, so the file's alpha must differ from peft's
    adapter = {"r": 4, "alpha": 8, "rslora": True, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]}
    run = make_run(tmp_path, {**LM, "adapter": adapter}, scale=0.05)
    result = run_cli("export", str(run.path), "--format", "gguf", "--out", str(tmp_path / "gguf"), timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "gguf"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p.name for p in out.iterdir()} == {"base.gguf", "adapter.gguf", "manifest.json"}
    assert manifest["sha256"] == {name: sha256_file(out / name) for name in ("base.gguf", "adapter.gguf")}
    assert manifest["usage"] == "llama-cli -m base.gguf --lora adapter.gguf"

    reader, base = gguf.GGUFReader(out / "adapter.gguf"), gguf.GGUFReader(out / "base.gguf")
    assert (_field(reader, "general.type"), _field(reader, "adapter.type")) == ("adapter", "lora")
    assert _field(reader, "general.architecture") == _field(base, "general.architecture") == "llama"
    scaling = 8 / 4**0.5
    alpha = _field(reader, "adapter.lora.alpha")
    assert alpha == pytest.approx(scaling * 4)  # llama.cpp scales by alpha / r

    model, _ = load_run_model(run, quantization="none")
    config = model.model.config
    base_tensors = {t.name: t for t in base.tensors}
    pairs = {t.name: t for t in reader.tensors}
    assert len(pairs) == 2 * 4 * config.num_hidden_layers
    processor = LlamaTensorProcessor(config=config.to_dict())
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "ffn_down": "mlp.down_proj"}
    merged = model.model.merge_and_unload()
    for name, a in pairs.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b, weight = pairs[f"{target}.lora_b"], base_tensors[target]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        # llama.cpp's shape checks: model ne0 == a ne0 (in), model ne1 == b ne1 (out), a ne1 == b ne0 (r)
        assert (weight.shape[0], weight.shape[1], a.shape[1]) == (a.shape[0], b.shape[1], b.shape[0]) and a.shape[1] == 4
        if target not in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.5.attn_v.weight", "blk.29.ffn_down.weight"):
            continue
        dequantized = gguf.quants.dequantize(weight.data, weight.tensor_type).reshape(int(weight.shape[1]), -1)
        applied = dequantized + alpha / 4 * (np.asarray(b.data).reshape(int(b.shape[1]), -1) @ np.asarray(a.data))
        as_transformers = processor.process(applied, target).weights  # undoes GGUF's q/k row order
        block, kind = target.split(".")[1], target.split(".")[2]
        expected = merged.get_submodule(f"model.layers.{block}.{hf_names[kind]}").weight.detach().numpy()
        np.testing.assert_allclose(as_transformers, expected, atol=2e-5)
        base_only = processor.process(dequantized, target).weights
        assert np.abs(expected - base_only).max() > 1e-3  # the adapter matters

    edge = run_cli("edge", "run", str(out), "--text", "hi", timeout=120)
    assert edge.returncode == 2 and "llama-cli -m base.gguf --lora adapter.gguf" in edge.stderr


def test_gguf_refuses_what_llama_cpp_cannot_take(tmp_path):
    classifier = make_run(tmp_path / "cls", {"model": {"name": "minilm-l6", "max_length": 48}, "data": {"eval": "synthetic:support/eval", "labels": ["complaint", "praise", "question"]}})
    result = run_cli("export", str(classifier.path), "--format", "gguf", "--out", str(tmp_path / "x"), timeout=300)
    assert result.returncode == 2 and "needs a causal LM whose base is a GGUF file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    lm = make_run(tmp_path / "lm", {**LM, "adapter": {"r": 2, "target_modules": ["q_proj"]}})
    result = run_cli("export", str(lm.path), "--format", "gguf", "--quantize", "int8", "--out", str(tmp_path / "y"), timeout=300)
    assert result.returncode == 2 and "not with --clients or --quantize" in result.stderr
    folded = make_run(tmp_path / "flora", {**LM, "adapter": {"r": 2, "target_modules": ["q_proj"]}, "strategy": {"name": "flora"}}, residual=True)
    result = run_cli("export", str(folded.path), "--format", "gguf", "--out", str(tmp_path / "z"), timeout=300)
    assert result.returncode == 2 and "changed the base weights (base_residual.safetensors)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "z").exists()
