"""Tokens per second of generation: onnxruntime-genai (what `fedtune export` builds now) against
the hand-written onnxruntime loop fedtune used before, and PyTorch, side by side in one run.

All three run the same merged fp32 model of RUN (a causal-LM run) on the same 5 prompts,
greedy, batch 1, 32 new tokens each (EOS ignored so every prompt decodes 32 tokens), on
THREADS threads. The hand-written loop is the previous runtime's: a ``torch.onnx.export`` of
the decoder with KV-cache inputs/outputs, driven step by step from numpy (kept here, and only
here, as the baseline). Each row also says whether its first 32 greedy tokens (stopping at
EOS) equal PyTorch's on every prompt.

    python benchmarks/lm_generation.py RUN [--out DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import torch
from transformers import DynamicCache

from fedtune.core.rundir import RunDir
from fedtune.edge import Bundle
from fedtune.edge.export import export_bundle
from fedtune.engine.checkpoint import load_run_model

PROMPTS = [
    "Review: a gripping, well acted film\nSentiment:",
    "The capital of France is",
    "Once upon a time",
    "Review: the plot drags and the jokes fall flat\nSentiment:",
    "My favourite food is",
]
NEW_TOKENS = 32


class _DecoderWithCache(torch.nn.Module):
    """The previous export's interface: (ids, mask, positions, past...) -> (logits, present...)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache
        )
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def hand_written_session(model, path: Path, threads: int) -> tuple[ort.InferenceSession, tuple[int, int, int]]:  # noqa: ANN001
    config = model.config
    shape = (config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    names = [f"past.{i}.{kv}" for i in range(shape[0]) for kv in ("key", "value")]
    presents = [n.replace("past.", "present.") for n in names]
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"}, "position_ids": {0: "b", 1: "s"}}
    axes |= {"logits": {0: "b", 1: "s"}} | {n: {0: "b", 2: "p"} for n in names} | {n: {0: "b", 2: "t"} for n in presents}
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    past = [torch.zeros(2, shape[1], 3, shape[2]) for _ in names]
    torch.onnx.export(
        _DecoderWithCache(model).eval(),
        (ids, mask, torch.arange(3, 8).expand(2, 5), *past),
        str(path),
        input_names=["input_ids", "attention_mask", "position_ids", *names],
        output_names=["logits", *presents],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), shape


def hand_written_generate(session: ort.InferenceSession, shape: tuple[int, int, int], prompt: list[int], eos: int | None) -> list[int]:
    layers, heads, head_dim = shape
    past = {f"past.{i}.{kv}": np.zeros((1, heads, 0, head_dim), np.float32) for i in range(layers) for kv in ("key", "value")}
    ids = np.array([prompt], np.int64)
    mask, positions, out = np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None], []
    for _ in range(NEW_TOKENS):
        logits, *presents = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        past = dict(zip(past, presents))
        ids = np.array([[token]], np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        positions = np.array([[mask.shape[1] - 1]], np.int64)
    return out


def genai_forced(bundle: Bundle, prompt: list[int]) -> int:
    """Decode exactly NEW_TOKENS tokens with onnxruntime-genai (EOS not allowed to stop it)."""
    params = og.GeneratorParams(bundle.session)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, min_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(bundle.session, params)
    generator.append_tokens([prompt])
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return steps


def tokens_per_second(decode, prompts: list[list[int]]) -> float:  # noqa: ANN001
    """Median over prompts of new tokens / wall time, prompt processing included."""
    rates = []
    for ids in prompts:
        started = time.perf_counter()
        produced = decode(ids)
        rates.append(produced / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where the bundles go (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtune-lm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    adapter, _ = load_run_model(RunDir.open(args.run), quantization="none")
    merged = adapter.model.merge_and_unload().eval()
    tokenizer, eos = adapter.tokenizer, adapter.tokenizer.eos_token_id
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    reference = []
    with torch.no_grad():
        for ids in prompts:
            tokens = merged.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
            tokens = tokens[0, len(ids) :].tolist()
            reference.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)

        def torch_forced(ids: list[int]) -> int:
            kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": eos}
            return merged.generate(torch.tensor([ids]), **kwargs).shape[1] - len(ids)

        torch_rate = tokens_per_second(torch_forced, prompts)

    session, shape = hand_written_session(merged, out / "hand-written.onnx", args.threads)
    loop_rate = tokens_per_second(lambda ids: len(hand_written_generate(session, shape, ids, None)), prompts)
    loop_same = sum(hand_written_generate(session, shape, ids, eos) == ref for ids, ref in zip(prompts, reference))

    export_bundle(RunDir.open(args.run), out / "genai", check_examples=32, echo=lambda *_: None)
    bundle = Bundle.load(out / "genai", threads=args.threads)
    genai_rate = tokens_per_second(lambda ids: genai_forced(bundle, ids), prompts)
    genai_same = sum(bundle.generate_ids(ids, NEW_TOKENS) == ref for ids, ref in zip(prompts, reference))

    rows = {
        "pytorch_generate": {"tokens_per_s": torch_rate, "greedy_identical_to_pytorch": f"{len(prompts)}/{len(prompts)}"},
        "hand_written_ort_loop": {"tokens_per_s": loop_rate, "greedy_identical_to_pytorch": f"{loop_same}/{len(prompts)}"},
        "onnxruntime_genai": {"tokens_per_s": genai_rate, "greedy_identical_to_pytorch": f"{genai_same}/{len(prompts)}"},
    }
    for row in rows.values():
        row["vs_pytorch"] = round(row["tokens_per_s"] / torch_rate, 2)
        row["vs_hand_written"] = round(row["tokens_per_s"] / loop_rate, 2)
    print(json.dumps({"run": str(args.run), "threads": args.threads, "new_tokens": NEW_TOKENS, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
