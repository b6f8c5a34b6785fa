"""Peak memory of a DP-SGD step at a large logical batch, whole or in physical chunks, next to
a non-private step at an ordinary batch: what ``client.max_physical_batch`` buys.

Each case runs in a fresh process (MiniLM-L6 + LoRA, SST-2 sentences, ``model.max_length``
64, FedIT's trained set, one optimizer step through fedtune's own trainers):

- ``backprop-32``: ``BackpropTrainer``, batch 32 (the recipes' batch without DP);
- ``dpsgd-1024``: ``DPSGDTrainer``, expected (Poisson) batch 1,024 in one physical batch;
- ``dpsgd-1024/64``: the same logical batch in physical chunks of 64.

The process records its resident set after the imports (baseline), loads the model and the
data, runs one untimed inference forward, frees what it can, resets the kernel's
high-water mark (``/proc/self/clear_refs``) and runs the step. Peak = high-water mark minus
the baseline (weights included); extra = peak minus the loaded model. The Poisson draw is
seeded, so both DP cases draw the same examples.

    python benchmarks/dp_memory.py --out /tmp/dp-memory.json
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
from zo_memory import ALLOCATOR  # noqa: E402

CASES = {"backprop-32": (32, None), "dpsgd-1024": (1024, None), "dpsgd-1024/64": (1024, 64)}
EXAMPLES = 4096  # the client's data: a logical batch of 1,024 is a sample rate of 1/4


def measure(case: str, data: str) -> dict:
    import torch

    from fedtune.config import load_config
    from fedtune.engine.adapters import build_adapter_model
    from fedtune.engine.data import TaskSpec, encode
    from fedtune.engine.dp_ledger import PrivacyLedger
    from fedtune.engine.resolve import resolve
    from fedtune.engine.trainers import BackpropTrainer, DPSGDTrainer
    from fedtune.engine.trainers.base import to_device
    from fedtune.records import read_records

    batch, physical = CASES[case]
    overrides = ["model.max_length=64", "data.text_field=sentence", "data.labels=[0,1]", "client.local_steps=1"]
    overrides += [f"client.batch_size={batch}", "data.train=synthetic:support/train"]
    if physical:
        overrides.append(f"client.max_physical_batch={physical}")
    config = resolve(load_config(None, overrides), name_hint="dp-memory", need_train_data=False)
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
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if case.startswith("dpsgd"):
        ledger = PrivacyLedger.load(Path(os.environ.get("TMPDIR", "/tmp")) / f"dp-memory-{os.getpid()}", 1e-5)
        trainer = DPSGDTrainer(ledger, 1.0, 1.0, batch / len(train), random.Random(0))
    else:
        trainer = BackpropTrainer()
    result = trainer.train(model, params, train, config.client, random.Random(0))
    peak = rss_mb("VmHWM")
    return {
        "case": case,
        "examples_in_step": result.examples,
        "loaded_mb": round(loaded - baseline, 1),
        "peak_mb": round(peak - baseline, 1),
        "extra_mb": round(peak - loaded, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2" / "train.tsv"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(args.case, args.data)))
        return
    results = [
        run_case([sys.executable, __file__, "--data", args.data, "--case", case], env={**os.environ, **ALLOCATOR})
        for case in CASES
    ]
    reference = results[0]["extra_mb"]
    print("\n| step | examples | peak (weights included) | extra over the loaded model | extra / backprop-32 |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['examples_in_step']} | {r['peak_mb']:.0f} MB | {r['extra_mb']:.0f} MB "
            f"| {r['extra_mb'] / reference:.1f}× |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
