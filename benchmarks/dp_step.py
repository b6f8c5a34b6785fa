"""Peak memory and time of a DP-SGD step at a large logical batch, next to a non-private step
at an ordinary batch: what ``client.max_physical_batch`` buys, whether its length-sorted chunks
matter, and whether Opacus' ghost clipping would be faster or leaner.

Each case runs in a fresh process (MiniLM-L6 + LoRA, SST-2 sentences, ``model.max_length``
64, FedIT's trained set, optimizer steps through fedtune's own trainers):

- ``backprop-32``: ``BackpropTrainer``, batch 32 (the recipes' batch without DP);
- ``dpsgd-1024``: ``DPSGDTrainer``, expected (Poisson) batch 1,024 in one physical batch;
- ``dpsgd-1024/64``: the same logical batch in physical chunks of 64 (fedtune's chunks, grouped
  by length);
- ``dpsgd-1024/64-unsorted``: the same chunks in drawing order (what chunking does without the
  grouping);
- ``ghost-1024/64``: the same chunks through Opacus' ghost clipping
  (``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``, the ``grad_sample_mode="ghost"`` path of ``make_private``):
  per-example gradient norms without per-example gradients, at the price of a second backward.

The process records its resident set after the imports (baseline), loads the model and the
data, runs one untimed inference forward, frees what it can, resets the kernel's
high-water mark (``/proc/self/clear_refs``) and runs ``--steps`` steps, timed. Peak = high-water
mark minus the baseline (weights included); extra = peak minus the loaded model. The Poisson
draws are seeded, so every DP case draws the same examples.

    python benchmarks/dp_step.py --out /tmp/dp-step.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from quantized_memory import release_freed_memory, rss_mb, run_case  # noqa: E402
from zo_memory import ALLOCATOR  # noqa: E402

CASES = {  # batch, physical chunk, how
    "backprop-32": (32, None, "backprop"),
    "dpsgd-1024": (1024, None, "hooks"),
    "dpsgd-1024/64": (1024, 64, "hooks"),
    "dpsgd-1024/64-unsorted": (1024, 64, "unsorted"),
    "ghost-1024/64": (1024, 64, "ghost"),
}
EXAMPLES = 4096  # the client's data: a logical batch of 1,024 is a sample rate of 1/4


def ghost_steps(model, params, train, batch: int, physical: int, steps: int) -> int:
    """DP-SGD steps through Opacus' ghost clipping, in fedtune's length-sorted chunks."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from fedtune.engine.data import physical_chunks, poisson_sample
    from fedtune.engine.trainers.base import to_device

    model.model.train()
    module = GradSampleModuleFastGradientClipping(
        model.model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.AdamW(params.values(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(module, optimizer, torch.nn.CrossEntropyLoss(), "mean")
    rng, examples = random.Random(0), 0
    for _ in range(steps):
        chunks = physical_chunks(poisson_sample(len(train), batch / len(train), rng), physical, train.length)
        for index, chunk in enumerate(chunks):
            inputs = to_device(train.collate(chunk), model.device)
            logits = module(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            criterion(logits, inputs["labels"]).backward()
            examples += len(chunk)
            optimizer.signal_skip_step(do_skip=index < len(chunks) - 1)
            optimizer.step()
            optimizer.zero_grad()
    return examples


def measure(case: str, data: str, steps: int) -> dict:
    import torch

    import fedtune.engine.trainers.dpsgd as dpsgd
    from fedtune.cli.resolve import resolve
    from fedtune.core.config import load_config
    from fedtune.core.records import read_records
    from fedtune.engine.adapters import build_adapter_model
    from fedtune.engine.data import TaskSpec, encode
    from fedtune.engine.dp_ledger import PrivacyLedger
    from fedtune.engine.trainers import BackpropTrainer, DPSGDTrainer
    from fedtune.engine.trainers.base import to_device

    batch, physical, how = CASES[case]
    overrides = ["model.max_length=64", "data.text_field=sentence", "data.labels=[0,1]", f"client.local_steps={steps}"]
    overrides += [f"client.batch_size={batch}", "data.train=synthetic:support/train"]
    if physical:
        overrides.append(f"client.max_physical_batch={physical}")
    config = resolve(load_config(None, overrides), name_hint="dp-step", need_train_data=False)
    release_freed_memory()
    baseline = rss_mb()
    model = build_adapter_model(config, ["0", "1"])
    rows = list(read_records(data))[:EXAMPLES]
    train = encode(rows, TaskSpec.from_config(config), model.tokenizer, data)
    with torch.inference_mode():  # touch every weight once
        model.model(**to_device(next(train.batches(32, random.Random(0))), model.device))
    release_freed_memory()
    loaded = rss_mb()
    params = model.trainable(["lora_A", "lora_B", "head"])
    if how == "unsorted":
        dpsgd.physical_chunks = lambda chosen, limit, length: (
            [chosen[start : start + limit] for start in range(0, len(chosen), limit)] or [chosen]
        )
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    if how == "ghost":
        examples = ghost_steps(model, params, train, batch, physical, steps)
    else:
        if how == "backprop":
            trainer = BackpropTrainer()
        else:
            ledger = PrivacyLedger.load(Path(os.environ.get("TMPDIR", "/tmp")) / f"dp-step-{os.getpid()}", 1e-5)
            trainer = DPSGDTrainer(ledger, 1.0, 1.0, batch / len(train), random.Random(0))
        examples = trainer.train(model, params, train, config.client, random.Random(0)).examples
    elapsed = time.perf_counter() - started
    peak = rss_mb("VmHWM")
    return {
        "case": case,
        "steps": steps,
        "examples": examples,
        "seconds_per_step": round(elapsed / steps, 2),
        "examples_per_second": round(examples / elapsed, 1),
        "loaded_mb": round(loaded - baseline, 1),
        "peak_mb": round(peak - baseline, 1),
        "extra_mb": round(peak - loaded, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(args.case, args.data, args.steps)))
        return
    results = [
        run_case(
            [sys.executable, __file__, "--data", args.data, "--steps", str(args.steps), "--case", case],
            env={**os.environ, **ALLOCATOR},
        )
        for case in CASES
    ]
    reference = results[0]
    print(
        "\n| step | examples/step | s/step | examples/s | peak (weights included) | extra over the loaded model | extra / backprop-32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['examples'] / r['steps']:.0f} | {r['seconds_per_step']:.2f} | {r['examples_per_second']:.0f} "
            f"| {r['peak_mb']:.0f} MB | {r['extra_mb']:.0f} MB | {r['extra_mb'] / reference['extra_mb']:.1f}× |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
