"""Does llama.cpp apply a `fedtune export --format gguf` adapter as PyTorch applies the run's adapter?

llama.cpp (through llama-cpp-python, which compiles it on install: not a fedtune dependency)
loads ``base.gguf`` alone and with ``--lora adapter.gguf``; PyTorch loads the run's model with
the adapter disabled and enabled. On 5 prompts (the same token ids on both sides) it reports:
how the adapter changes the logits in each (cosine similarity and relative difference of
the two changes, all positions), how close the two bases are (llama.cpp computes with the
Q4_1 weights and 8-bit activations, PyTorch with the dequantized weights in fp32), and
whether 16 greedy tokens agree, with and without the adapter.

    pip install --no-deps llama-cpp-python diskcache   # compiles llama.cpp (about 20 min on 2 cores)
    python benchmarks/gguf_llama_cpp.py RUN GGUF_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama

from fedtune.core.rundir import RunDir
from fedtune.engine.checkpoint import load_run_model

PROMPTS = [
    "Message: my parcel never arrived and nobody answers\nIntent:",
    "Message: thank you, the nurse was wonderful\nIntent:",
    "Message: how do I reset my router?\nIntent:",
    "The capital of France is",
    "Once upon a time",
]
NEW_TOKENS = 16


def llama_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm: Llama, ids: list[int], eos: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


@torch.no_grad()
def torch_greedy(model, ids: list[int], eos: int) -> list[int]:  # noqa: ANN001
    tokens = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)[0, len(ids) :].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("gguf_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter, _ = load_run_model(RunDir.open(args.run), quantization="none")
    model, tokenizer = adapter.model.eval(), adapter.tokenizer
    eos = tokenizer.eos_token_id
    common = {"n_ctx": 256, "n_threads": args.threads, "logits_all": True, "verbose": False}
    base_llm = Llama(model_path=str(args.gguf_dir / "base.gguf"), **common)
    lora_llm = Llama(model_path=str(args.gguf_dir / "base.gguf"), lora_path=str(args.gguf_dir / "adapter.gguf"), **common)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            with model.disable_adapter():
                torch_base = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
                base_tokens = torch_greedy(model, ids, eos)
            torch_lora = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
            lora_tokens = torch_greedy(model, ids, eos)
        cpp_base, cpp_lora = llama_logits(base_llm, ids), llama_logits(lora_llm, ids)
        torch_change, cpp_change = (torch_lora - torch_base).ravel(), (cpp_lora - cpp_base).ravel()
        rows.append(
            {
                "prompt": prompt,
                "adapter_change_cosine": round(float(torch_change @ cpp_change / np.linalg.norm(torch_change) / np.linalg.norm(cpp_change)), 4),
                "adapter_change_relative_difference": round(float(np.linalg.norm(cpp_change - torch_change) / np.linalg.norm(torch_change)), 4),
                "adapter_change_norm_torch": round(float(np.linalg.norm(torch_change)), 1),
                "base_relative_difference": round(float(np.linalg.norm(cpp_base - torch_base) / np.linalg.norm(torch_base)), 4),
                "greedy_equal_with_adapter": llama_greedy(lora_llm, ids, eos) == lora_tokens,
                "greedy_equal_base": llama_greedy(base_llm, ids, eos) == base_tokens,
                "adapter_changes_greedy": lora_tokens != base_tokens,
            }
        )
    summary = {
        "min_adapter_change_cosine": min(r["adapter_change_cosine"] for r in rows),
        "mean_adapter_change_cosine": round(float(np.mean([r["adapter_change_cosine"] for r in rows])), 4),
        "mean_adapter_change_relative_difference": round(float(np.mean([r["adapter_change_relative_difference"] for r in rows])), 4),
        "greedy_equal_with_adapter": f"{sum(r['greedy_equal_with_adapter'] for r in rows)}/{len(rows)}",
        "greedy_equal_base": f"{sum(r['greedy_equal_base'] for r in rows)}/{len(rows)}",
        "adapter_changes_greedy": f"{sum(r['adapter_changes_greedy'] for r in rows)}/{len(rows)}",
    }
    print(json.dumps({"run": str(args.run), "gguf": str(args.gguf_dir), "summary": summary, "prompts": rows}, indent=2))


if __name__ == "__main__":
    main()
