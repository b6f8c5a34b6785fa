"""Memory of a quantized frozen base: resident weights and a training step's peak, side by side.

Each (model, quantization) case runs in a fresh process. After the imports, the process
records its resident set (the baseline); then it loads the adapter model, runs one inference forward (an fp32
checkpoint is memory-mapped and only becomes resident when read) and records the resident
set again (resident weights = the difference; also the exact bytes of the model's
parameters and buffers); then it resets the kernel's high-water mark
(``/proc/self/clear_refs``), runs one LoRA training step (forward, backward, AdamW) on a
batch of real SST-2 sentences padded to the stated length, and reads the high-water mark
(step peak = high-water mark minus the baseline). On CUDA it reports
``torch.cuda.max_memory_allocated`` for the same phases instead.

    python benchmarks/quantized_memory.py --out BENCHMARKS-quantized-memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = [(model, q) for model in ("smollm2-135m", "minilm-l6") for q in ("none", "int8", "nf4")]


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS shows what is live (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(model_name: str, quantization: str, batch: int, length: int, data: str) -> dict:
    """One case, in this (fresh) process."""
    import torch

    sys.path.insert(0, str(REPO))
    from fedtune.cli.resolve import resolve
    from fedtune.core.config import load_config
    from fedtune.core.records import read_records
    from fedtune.engine.adapters import build_adapter_model

    task = "causal-lm" if model_name.startswith("smollm2") else "classification"
    overrides = [f"model.name={model_name}", f"model.task={task}", f"model.quantization={quantization}"]
    overrides += [f"model.max_length={length}", "data.train=synthetic:support/train", "data.labels=[0,1]"]
    config = resolve(load_config(None, overrides), name_hint="memory", need_train_data=False)
    cuda = torch.cuda.is_available()
    release_freed_memory()
    baseline = rss_mb()
    model = build_adapter_model(config, ["0", "1"])
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.model.parameters(), *model.model.buffers()])
    sentences = [row["sentence"] for row in read_records(data)[:batch]]
    batch_inputs = model.tokenizer(
        sentences, return_tensors="pt", padding="max_length", truncation=True, max_length=length
    ).to(model.device)
    if task == "causal-lm":  # next-token loss on the sentence, not on its padding
        labels = batch_inputs["input_ids"].masked_fill(batch_inputs["attention_mask"] == 0, -100)
    else:
        labels = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():  # touch every weight: an fp32 checkpoint is memory-mapped, read lazily
        model.model(**batch_inputs)
    release_freed_memory()
    loaded = rss_mb()
    params = model.trainable(["lora_A", "lora_B", "head"])
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    model.model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before_step = torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    loss = model.model(**batch_inputs, labels=labels.to(model.device)).loss
    loss.backward()
    optimizer.step()
    result = {
        "model": model_name,
        "quantization": quantization,
        "batch": batch,
        "length": length,
        "device": str(model.device),
        "baseline_rss_mb": round(baseline, 1),
        "resident_weights_mb": round(loaded - baseline, 1),
        "weight_bytes_mb": round(weight_bytes / 2**20, 1),
        "step_peak_mb": round(rss_mb("VmHWM") - baseline, 1),
        "loss": loss.item(),
    }
    if cuda:
        result["cuda_weights_mb"] = round(before_step / 2**20, 1)
        result["cuda_step_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def run_case(command: list[str], env: dict[str, str] | None = None) -> dict:
    """One measurement in a fresh process (its last stdout line is the JSON result), echoed."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:])}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--settings", default="1x64,8x256", help="batch x length pairs, comma separated")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", nargs=4, metavar=("MODEL", "QUANTIZATION", "BATCH", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process: one measurement, printed as JSON
        model_name, quantization, batch, length = args.case
        print(json.dumps(measure(model_name, quantization, int(batch), int(length), args.data)))
        return
    results = []
    for setting in args.settings.split(","):
        batch, length = setting.split("x")
        for model_name, quantization in CASES:
            command = [sys.executable, __file__, "--data", args.data, "--case", model_name, quantization, batch, length]
            results.append(run_case(command))
    print("\n| model | batch x length | base | resident weights | step peak | vs fp32 (weights / peak) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        fp32 = next(
            r
            for r in results
            if r["model"] == row["model"] and r["quantization"] == "none" and r["batch"] == row["batch"]
            and r["length"] == row["length"]
        )  # fmt: skip
        print(
            f"| {row['model']} | {row['batch']} x {row['length']} | {row['quantization']} "
            f"| {row['resident_weights_mb']:.0f} MB | {row['step_peak_mb']:.0f} MB "
            f"| {row['resident_weights_mb'] / fp32['resident_weights_mb']:.2f} / "
            f"{row['step_peak_mb'] / fp32['step_peak_mb']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
