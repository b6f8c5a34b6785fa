"""What fedtune's federation costs on top of the training itself, side by side in one run.

Three runs of the same work (same partitions, same local steps, batch size and final
evaluation), each timed as a whole process from start to exit:

  plain     a plain PyTorch + peft FedAvg loop in one process (no Flower, no Ray)
  fedtune   ``fedtune simulate`` (SuperLink + Simulation Engine + our ServerApp/ClientApp)
  reload    ``fedtune simulate`` with a ClientApp that reloads the base model for every
            message, as FlowerTune's example does

Ratios: fedtune / plain is the framework overhead; reload / fedtune is what keeping the
base model loaded saves.

    python benchmarks/framework_overhead.py --clients 4 --rounds 5 --local-steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "simulations" / "configs" / "sst2-minilm.yaml"


def bench_config(args: argparse.Namespace) -> list[str]:
    """Overrides that make the SST-2 config the benchmark workload."""
    return [
        f"federation.clients={args.clients}",
        f"federation.min_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        "federation.eval_every=0",
        f"client.local_steps={args.local_steps}",
        "data.holdout=0",
        f"data.eval_max_examples={args.eval_examples}",
        "output.plots=false",
    ]


def plain_loop(config_path: str, overrides: list[str]) -> dict:
    """FedAvg with plain PyTorch + peft: the same steps, none of the framework."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.cli.resolve import resolve
    from fedtune.core.config import load_config
    from fedtune.engine.base_model import model_dir
    from fedtune.engine.data import collate
    from fedtune.engine.partition import client_rows

    config = resolve(load_config(config_path, overrides), name_hint="plain", need_train_data=True)
    torch.manual_seed(config.seed)
    source = model_dir(config.model.name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    labels = config.data.labels
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.adapter.r,
            lora_alpha=config.adapter.alpha,
            lora_dropout=config.adapter.dropout,
            target_modules=config.adapter.target_modules,
            modules_to_save=["classifier"],
        ),
    )

    def encode(rows):
        ids = tokenizer([r[config.data.text_field] for r in rows], truncation=True, max_length=config.model.max_length)[
            "input_ids"
        ]
        return [{"input_ids": x, "label": labels.index(str(r[config.data.label_field]))} for x, r in zip(ids, rows)]

    clients = [encode(client_rows(config, i)[0]) for i in range(config.federation.clients)]
    global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    for rnd in range(config.federation.rounds):
        states, sizes = [], []
        for index, data in enumerate(clients):
            set_peft_model_state_dict(model, global_state)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.client.lr)
            rng = random.Random(f"{rnd}:{index}")
            model.train()
            for _ in range(config.client.local_steps):
                batch = collate(rng.sample(data, config.client.batch_size), tokenizer.pad_token_id)
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            states.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
            sizes.append(len(data))
        global_state = {k: sum(s[k] * n for s, n in zip(states, sizes)) / sum(sizes) for k in states[0]}
    set_peft_model_state_dict(model, global_state)
    model.eval()
    from fedtune.core.records import read_records

    rows = read_records(config.data.eval)[: config.data.eval_max_examples]
    examples = sorted(encode(rows), key=lambda e: len(e["input_ids"]))
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            batch = collate(examples[start : start + 64], tokenizer.pad_token_id)
            correct += (
                (
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
                    == batch["labels"]
                )
                .sum()
                .item()
            )
    return {"eval_accuracy": correct / len(examples)}


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = bench_config(args)
    if args.plain_only:
        print(json.dumps(plain_loop(str(BASE_CONFIG), overrides)))
        return

    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    sets = [part for o in overrides for part in ("--set", o)]
    fedtune = [sys.executable, "-m", "fedtune.cli", "simulate", str(BASE_CONFIG), *sets]
    reload_cmd = [*fedtune, "--app", str(REPO / "benchmarks" / "reload_app")]
    results = {}
    for name, command in (
        (
            "plain",
            [
                sys.executable,
                __file__,
                "--plain-only",
                "--clients",
                str(args.clients),
                "--rounds",
                str(args.rounds),
                "--local-steps",
                str(args.local_steps),
                "--eval-examples",
                str(args.eval_examples),
            ],
        ),
        ("fedtune", [*fedtune, "--out", str(work / "fedtune")]),
        ("reload", [*reload_cmd, "--out", str(work / "reload")]),
    ):
        elapsed, _ = timed(command)
        results[name] = {"wall_s": round(elapsed, 1)}
        print(f"{name:8s} {elapsed:7.1f} s", flush=True)
    for name in ("fedtune", "reload"):
        summary = json.loads((work / name / "summary.json").read_text())
        results[name]["eval_accuracy"] = summary["final"].get("eval_accuracy")
        results[name]["client_base_model_loads"] = summary["client_base_model_loads"]
    messages = args.clients * args.rounds  # train messages; the reload app loads for each, and for evaluations
    if results["reload"]["client_base_model_loads"] < messages:
        sys.exit(f"the reload baseline loaded the base model {results['reload']['client_base_model_loads']} times "
                 f"for {messages} train messages: it does not reload, so the comparison would be void")  # fmt: skip
    steps = args.clients * args.rounds * args.local_steps
    report = {
        "workload": {
            "clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "total_steps": steps,
            "model": "minilm-l6",
            "data": "SST-2 (sst2-minilm.yaml)",
        },
        "runs": results,
        "overhead_ratio": round(results["fedtune"]["wall_s"] / results["plain"]["wall_s"], 3),
        "reload_ratio": round(results["reload"]["wall_s"] / results["fedtune"]["wall_s"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
