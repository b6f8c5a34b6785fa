"""PyTorch eager vs onnxruntime fp32 / int8 / int4 bundles, side by side in one run.

Classifier (a MiniLM SST-2 run): batch-1 latency (median over sentences of SST-2 dev),
model size, accuracy on the whole of ../shared/data/sst2/dev.tsv.
Causal LM (a SmolLM2 run): per-token latency of greedy decoding with the KV cache
(median over 5 prompts x 32 tokens), model size, next-token agreement with PyTorch fp32
and perplexity on held-out text (the export's quality check).

    python benchmarks/edge_export.py --classifier-run RUN_DIR --lm-run RUN_DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedtune.core.records import read_records
from fedtune.core.rundir import RunDir
from fedtune.edge import Bundle, bench
from fedtune.edge.export import export_bundle
from fedtune.engine.checkpoint import load_run_model

SST2_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2" / "dev.tsv"
PROMPTS = [
    "Review: a gripping, well acted film\nSentiment:",
    "The capital of France is",
    "Once upon a time",
    "Review: the plot drags and the jokes fall flat\nSentiment:",
    "My favourite food is",
]


def median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 3)


def classifier(run_dir: Path, out: Path, latency_examples: int) -> dict:
    rows = list(read_records(str(SST2_DEV)))
    texts = [r["sentence"] for r in rows]
    model, _ = load_run_model(RunDir.open(run_dir))
    merged = model.model.merge_and_unload().eval()
    torch_latency = []
    with torch.no_grad():
        for text in texts[:latency_examples]:  # text in, logits out: tokenization timed on both sides
            started = time.perf_counter()
            merged(**model.tokenizer([text], truncation=True, max_length=64, return_tensors="pt"))
            torch_latency.append(time.perf_counter() - started)
        correct = 0
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            inputs = model.tokenizer(
                [r["sentence"] for r in batch], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            predicted = merged(**inputs).logits.argmax(-1).tolist()
            correct += sum(model.labels[p] == r["label"] for p, r in zip(predicted, batch))
    fp32_size = None
    results = {
        "pytorch_eager": {
            "latency_ms_p50": median_ms(torch_latency),
            "accuracy": correct / len(rows),
            "model_bytes": sum(p.numel() * 4 for p in merged.parameters()),
        }
    }
    for mode in ("none", "int8", "int4"):
        manifest = export_bundle(
            RunDir.open(run_dir), out / f"cls-{mode}", quantize=mode, max_drop=100.0, echo=lambda *_: None
        )
        bundle = Bundle.load(out / f"cls-{mode}")
        latency = bench(bundle, rows[:latency_examples], "sentence", "label")["latency_ms_p50"]
        accuracy = bench(bundle, rows, "sentence", "label")["accuracy"]
        size = manifest["sizes"]["model_bytes"]
        fp32_size = fp32_size or size
        results[f"ort_{'fp32' if mode == 'none' else mode}"] = {
            "latency_ms_p50": latency,
            "accuracy": accuracy,
            "model_bytes": size,
            "size_vs_fp32": round(size / fp32_size, 3),
        }
    eager = results["pytorch_eager"]["latency_ms_p50"]
    for row in results.values():
        row["latency_vs_eager"] = round(row["latency_ms_p50"] / eager, 3)
        row["accuracy_drop_points_vs_eager"] = round(100 * (results["pytorch_eager"]["accuracy"] - row["accuracy"]), 2)
    return results


def language_model(run_dir: Path, out: Path) -> dict:
    model, _ = load_run_model(RunDir.open(run_dir))
    merged = model.model.merge_and_unload().eval()
    per_token, reference = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
            started = time.perf_counter()
            output = merged.generate(
                ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
            )
            per_token.append((time.perf_counter() - started) / (output.shape[1] - ids.shape[1]))
            greedy = merged.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
            tokens = greedy[0, ids.shape[1] :].tolist()  # the runtime stops at EOS too
            eos = model.tokenizer.eos_token_id
            reference.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    results = {
        "pytorch_eager": {
            "ms_per_token_p50": median_ms(per_token),
            "model_bytes": sum(p.numel() * 4 for p in merged.parameters()),
        }
    }
    fp32_size = None
    for mode in ("none", "int8", "int4"):
        manifest = export_bundle(
            RunDir.open(run_dir),
            out / f"lm-{mode}",
            quantize=mode,
            check_examples=200,
            min_agreement=0.0,
            echo=lambda *_: None,
        )
        bundle = Bundle.load(out / f"lm-{mode}")
        per_token, matching = [], 0
        for prompt, expected in zip(PROMPTS, reference):
            ids = bundle.tokenizer.encode(prompt).ids
            started = time.perf_counter()
            generated = bundle.generate_ids(ids, max_new_tokens=32)
            per_token.append((time.perf_counter() - started) / max(1, len(generated)))
            matching += generated == expected
        size = manifest["sizes"]["model_bytes"]
        fp32_size = fp32_size or size
        results[f"ort_{'fp32' if mode == 'none' else mode}"] = {
            "ms_per_token_p50": median_ms(per_token),
            "greedy_32_tokens_identical_to_pytorch": f"{matching}/{len(PROMPTS)} prompts",
            "model_bytes": size,
            "size_vs_fp32": round(size / fp32_size, 3),
            "kept_full_precision": manifest["quantization"]["kept_full_precision"],
            **manifest["quality_check"],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-run", type=Path, required=True)
    parser.add_argument("--lm-run", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where bundles go (default: a temporary directory)")
    parser.add_argument("--latency-examples", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtune-edge-bench-"))
    report = {"classifier": classifier(args.classifier_run, out, args.latency_examples)}
    if args.lm_run:
        report["language_model"] = language_model(args.lm_run, out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
