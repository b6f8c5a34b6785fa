"""Peak memory of a zeroth-order step vs an inference forward vs a backprop step, side by side.

Each (model, base, kind) case runs in a fresh process. After the imports the process
records its resident set (the baseline), loads the adapter model, builds a batch of
real SST-2 text cut into windows of exactly LENGTH tokens (classification: one label
per window), runs one untimed inference forward so the memory-mapped checkpoint is
resident, frees what it can, resets the kernel's high-water mark
(``/proc/self/clear_refs``) and runs the case through fedtune's own code:

- ``inference``: one forward with the loss, under ``torch.inference_mode`` (what
  ``fedtune evaluate`` does per batch);
- ``zo``: one ``ZOTrainer`` step (two forwards, perturb/restore, update), FFA's trained set;
- ``backprop``: one ``BackpropTrainer`` step (forward, backward, AdamW), FFA's trained set.

Peak = high-water mark minus the baseline (weights included); "extra" = peak minus the
loaded model. On CUDA the same phases report ``torch.cuda.max_memory_allocated``. After
its measurement, the inference case also records ``client.memory.estimate`` (what
``--mode auto`` decides on), to set beside the measured extras.

    python benchmarks/zo_memory.py --out /tmp/zo-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from quantized_memory import release_freed_memory, rss_mb, run_case  # noqa: E402

# Large buffers straight from mmap, returned on free: the high-water mark then tracks live
# tensors, not chunks glibc's heap keeps after a free (which made repeated runs differ by GBs).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

CASES = [
    (model, base, kind)
    for model, base in (("smollm2-135m", "none"), ("smollm2-135m", "nf4"), ("minilm-l6", "none"))
    for kind in ("inference", "zo", "backprop")
]


def windows(model, rows: list[dict], count: int, length: int, task: str) -> list[dict]:
    """COUNT examples of exactly LENGTH tokens: SST-2 sentences joined, then cut."""
    ids: list[int] = []
    for row in rows:
        ids += model.tokenizer(row["sentence"] + " ", add_special_tokens=False)["input_ids"]
        if len(ids) >= count * length:
            break
    examples = []
    for i in range(count):
        window = ids[i * length : (i + 1) * length]
        example = {"input_ids": window}
        example |= {"labels": window} if task == "causal-lm" else {"label": i % 2}
        examples.append(example)
    return examples


def measure(model_name: str, quantization: str, kind: str, batch: int, length: int, data: str) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from fedtune.cli.resolve import resolve
    from fedtune.core.config import load_config
    from fedtune.core.records import read_records
    from fedtune.engine.adapters import build_adapter_model
    from fedtune.engine.data import ExampleSet, TaskSpec
    from fedtune.engine.memory import MB, estimate
    from fedtune.engine.trainers import BackpropTrainer, ZOTrainer
    from fedtune.engine.trainers.base import to_device

    task = "causal-lm" if model_name.startswith("smollm2") else "classification"
    overrides = [f"model.name={model_name}", f"model.task={task}", f"model.quantization={quantization}"]
    overrides += [f"model.max_length={length}", "data.train=synthetic:support/train", "data.labels=[0,1]"]
    overrides += ["client.local_steps=1", f"client.batch_size={batch}"]
    config = resolve(load_config(None, overrides), name_hint="memory", need_train_data=False)
    cuda = torch.cuda.is_available()
    release_freed_memory()
    baseline = rss_mb()
    model = build_adapter_model(config, ["0", "1"])
    examples = windows(model, read_records(data), batch, length, task)
    data_set = ExampleSet(examples, model.tokenizer.pad_token_id or 0, TaskSpec.from_config(config))
    result: dict = {"model": model_name, "quantization": quantization, "kind": kind, "batch": batch, "length": length}
    batch_inputs = to_device(next(data_set.batches(batch, random.Random(0))), model.device)
    assert tuple(batch_inputs["input_ids"].shape) == (batch, length)
    with torch.inference_mode():  # touch every weight: an fp32 checkpoint is memory-mapped, read lazily
        model.model(**batch_inputs)
    release_freed_memory()
    loaded = rss_mb()
    params = model.trainable(["lora_B", "head"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if kind == "inference":
        with torch.inference_mode():
            loss = model.model(**batch_inputs).loss.item()
    else:
        trainer = ZOTrainer() if kind == "zo" else BackpropTrainer()
        loss = trainer.train(model, params, data_set, config.client, random.Random(0)).loss
    peak = rss_mb("VmHWM")
    result |= {
        "device": str(model.device),
        "loaded_mb": round(loaded - baseline, 1),
        "peak_mb": round(peak - baseline, 1),
        "extra_mb": round(peak - loaded, 1),
        "loss": loss,
    }
    if cuda:
        result["cuda_loaded_mb"] = round(before / 2**20, 1)
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if kind == "inference":  # after the measurement, which it must not disturb
        footprint = estimate(model, data_set, config.client)
        result |= {f"estimate_{k}_mb": round(v / MB, 1) for k, v in vars(footprint).items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "QUANTIZATION", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(*args.case, args.batch, args.length, args.data)))
        return
    results = []
    for case in CASES:
        command = [sys.executable, __file__, "--data", args.data, "--batch", str(args.batch)]
        command += ["--length", str(args.length), "--case", *case]
        results.append(run_case(command, env={**os.environ, **ALLOCATOR}))
    key = "cuda_peak_mb" if "cuda_peak_mb" in results[0] else "peak_mb"
    print(f"\n{args.batch} x {args.length} tokens, {key} (weights included); extra = above the loaded model")
    columns = ["model", "base", "inference peak", "zo peak", "backprop peak", "zo / inference", "backprop / zo"]
    columns += ["extra: inference / zo / backprop", "auto estimate: zo / backprop"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for model_name, quantization, _ in CASES[::3]:
        row = {r["kind"]: r for r in results if r["model"] == model_name and r["quantization"] == quantization}
        inf, zo, bp = row["inference"], row["zo"], row["backprop"]
        print(
            f"| {model_name} | {quantization} | {inf[key]:.0f} MB | {zo[key]:.0f} MB | {bp[key]:.0f} MB "
            f"| {zo[key] / inf[key]:.2f} | {bp[key] / zo[key]:.2f} "
            f"| {inf['extra_mb']:.0f} / {zo['extra_mb']:.0f} / {bp['extra_mb']:.0f} MB "
            f"| {inf['estimate_zo_mb'] - inf['estimate_resident_mb']:.0f} / "
            f"{inf['estimate_backprop_mb'] - inf['estimate_resident_mb']:.0f} MB extra |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
