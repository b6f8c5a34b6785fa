"""What an honest-but-curious coordinator learns of each client's labels, with and without secure aggregation.

The coordinator of a classifier run reads each client's change of the head's bias. For cross
entropy the bias gradient is Σ(p_i − y_i), so a client's bias moves up on the labels it holds
more of than the model predicts: the attack reads a client's majority label off the largest
coordinate of its bias change, and its label mix off the change's correlation with (its label
shares − the population's). Under secure aggregation the coordinator holds only the client's
masked vector; the audit reads the same coordinates of it as if they were unmasked.

Each run is ``fedtune simulate`` with ``benchmarks/audit_app`` (fedtune's app behind a Grid
that writes down what the coordinator receives), FFA-LoRA (the head travels), 10 clients,
Dirichlet α = 0.1, on SST-2 and AG News; the truth is each client's partition as fedtune builds
it from the run's resolved config. Three rounds each: 30 updates per run.

    python benchmarks/coordinator_audit.py --out /tmp/audit

Writes ``audit.json`` (resumable) and ``audit.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, pearsonr

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "benchmarks" / "audit_app"
DATASETS = {"sst2": "simulations/configs/sst2-minilm.yaml", "agnews": "simulations/configs/agnews-minilm.yaml"}
COMMON = [
    "strategy.name=ffa", "federation.eval_every=0", "data.partition.alpha=0.1", "data.eval_max_examples=200",
    "output.plots=false",
]  # fmt: skip
ROUNDS = 3


def run(dataset: str, mode: str, out: Path) -> Path:
    target = out / f"{dataset}-{mode}"
    received = target.with_suffix(".received.jsonl")
    if (target / "summary.json").is_file() and received.is_file():
        return target
    received.unlink(missing_ok=True)
    overrides = [*COMMON, f"federation.rounds={ROUNDS}"]
    overrides += ["federation.secure_aggregation=secagg+"] if mode == "secagg" else []
    args = [sys.executable, "-m", "fedtune.cli", "simulate", DATASETS[dataset], "--app", str(APP), "--out", str(target)]
    args += [a for s in overrides for a in ("--set", s)]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "FEDTUNE_AUDIT_OUT": str(received)})
    if result.returncode != 0:
        raise SystemExit(f"{dataset} {mode}: fedtune simulate failed:\n{result.stderr[-2000:]}")
    return target


def truth(run_dir: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each client's label shares (in the head's class order) and the population's."""
    from fedtune.core.config import load_config
    from fedtune.engine.partition import client_rows

    config = load_config(str(run_dir / "config.yaml"), [])
    labels = [str(label) for label in config.data.labels]
    shares, total = {}, Counter()
    for index in range(config.federation.clients):
        counts = Counter(str(row[config.data.label_field]) for row in client_rows(config, index)[0])
        total.update(counts)
        shares[f"client-{index}"] = np.array([counts[label] for label in labels], dtype=float) / sum(counts.values())
    population = np.array([total[label] for label in labels], dtype=float) / sum(total.values())
    return shares, population


def attack(run_dir: Path) -> dict:
    shares, population = truth(run_dir)
    seen = [json.loads(line) for line in run_dir.with_suffix(".received.jsonl").read_text().splitlines()]
    majority_hits, first_hits, pairs = [], [], []
    for record in seen:
        change, share = np.array(record["bias_change"]), shares[record["name"]]
        hit = int(np.argmax(change) == np.argmax(share))
        majority_hits.append(hit)
        if record["round"] == 1:
            first_hits.append(hit)
        pairs += list(zip(change - change.mean(), share - population))
    guess = np.mean([int(np.argmax(population) == np.argmax(share)) for share in shares.values()])
    x, y = np.array(pairs).T
    correlation = pearsonr(x, y)
    return {
        "majority_round1": float(np.mean(first_hits)),
        "majority_all": float(np.mean(majority_hits)),
        "chance": 1 / len(population),
        "majority_p": float(binomtest(sum(majority_hits), len(majority_hits), 1 / len(population), "greater").pvalue),
        "correlation": float(correlation.statistic),
        "correlation_p": float(correlation.pvalue),
        "guess": float(guess),
        "updates": len(seen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for dataset in DATASETS:
        for mode in ("clear", "secagg"):
            key = f"{dataset}-{mode}"
            results[key] = attack(run(dataset, mode, args.out))  # runs already finished are only read
            (args.out / "audit.json").write_text(json.dumps(results, indent=1))
            print(key, json.dumps(results[key]), flush=True)
    lines = [
        "| dataset | the coordinator receives | majority label right: round 1 / all rounds (chance; p vs chance) "
        "| corr(bias change, label shares − population) (p) | guessing the population's majority |",
        "|---|---|---|---|---|",
    ]
    for key, point in results.items():
        dataset, mode = key.split("-")
        what = "each client's update" if mode == "clear" else "masked vectors (secagg+)"
        lines.append(
            f"| {dataset} | {what} | {point['majority_round1']:.0%} / {point['majority_all']:.0%} of {point['updates']} "
            f"({point['chance']:.0%}; p = {point['majority_p']:.2g}) | {point['correlation']:+.2f} "
            f"(p = {point['correlation_p']:.2g}) | {point['guess']:.0%} |"
        )
    (args.out / "audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
