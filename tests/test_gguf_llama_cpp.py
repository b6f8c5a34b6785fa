"""The GGUF adapter in llama.cpp itself: it changes the logits as PyTorch's adapter does.

llama-cpp-python compiles llama.cpp when it installs (about 20 min on 2 cores), so it is not a
dependency and CI skips this test; it runs wherever llama-cpp-python is installed
(``pip install --no-deps llama-cpp-python==0.3.36 diskcache``). CI checks the adapter file's
structure and numbers without llama.cpp in tests/test_gguf_export.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from fedtune.engine.checkpoint import load_run_model
from test_edge import make_run

llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = ["Message: my parcel never arrived\nIntent:", "The capital of France is"]


def test_llama_cpp_applies_the_adapter_as_pytorch_does(tmp_path):
    # q and k only: the projections whose rows GGUF permutes, so a wrong permutation would show
    adapter = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj"]}
    run = make_run(
        tmp_path,
        {
            "model": {"name": "smollm2-135m", "task": "causal-lm", "max_length": 48},
            "adapter": adapter,
            "data": {"eval": "synthetic:support/eval", "prompt": "Message: {text}\nIntent:", "response": " {label}"},
        },
        scale=0.1,
    )
    out = tmp_path / "gguf"
    assert run_cli("export", str(run.path), "--format", "gguf", "--out", str(out), timeout=600).returncode == 0
    model, _ = load_run_model(run, quantization="none")
    common = {"n_ctx": 128, "n_threads": 2, "logits_all": True, "verbose": False}
    plain = llama_cpp.Llama(model_path=str(out / "base.gguf"), **common)
    adapted = llama_cpp.Llama(model_path=str(out / "base.gguf"), lora_path=str(out / "adapter.gguf"), **common)

    def cpp_logits(llm, ids: list[int]) -> np.ndarray:  # noqa: ANN001
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)

    for prompt in PROMPTS:
        ids = model.tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            with model.model.disable_adapter():
                torch_base = model.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
            torch_adapted = model.model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        torch_change = (torch_adapted - torch_base).ravel()
        cpp_change = (cpp_logits(adapted, ids) - cpp_logits(plain, ids)).ravel()
        cosine = torch_change @ cpp_change / np.linalg.norm(torch_change) / np.linalg.norm(cpp_change)
        assert cosine > 0.95, (prompt, cosine)
        assert 0.8 < np.linalg.norm(cpp_change) / np.linalg.norm(torch_change) < 1.25  # the scale (alpha / r)
