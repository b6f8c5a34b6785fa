"""The DP recipe sweep: which settings let sample-level DP-SGD learn, and the noise-to-signal
ratio (core/dp_accounting.py) of each, against whether it learned.

A proxy for one client of ``simulations/configs/sst2-dp.yaml``'s federation: an IID tenth of
SST-2's training rows (``fedtune partition --set data.partition.kind=iid``: 6,061 rows, the
size of the federation's median Dirichlet client, without its label skew, which alone would
decide what one client learns), trained alone with ``fedtune train`` for the steps one
client takes in the federated run (rounds x local steps), accounted the same way (its own
Poisson rate, target ε over those steps). Accuracy on 1,000 rows of
``sst2/dev.tsv``. Each point is one run directory; finished points are not rerun.

    python benchmarks/dp_sweep.py --out /tmp/dp-sweep            # runs what is missing, prints the table
    python benchmarks/dp_sweep.py --out /tmp/dp-sweep --only b512-e8-ffa,b512-none-ffa
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "simulations/configs/sst2-dp.yaml"

# name -> overrides of the recipe (ffa, batch 512, AdamW 2e-2, clip 1.5, ε = 8; 10 rounds x 2 steps, from PROXY)
OLD = ["client.lr=0.01", "privacy.max_grad_norm=10"]  # the first sweep's recipe: AdamW 1e-2, clip 10
POINTS: dict[str, list[str]] = {
    # the first guess (AdamW 2e-3, clip 1): DP learns nothing, and clipping alone is why
    "b512-none-ffa": ["client.lr=0.002", "privacy.max_grad_norm=1", "privacy.mode=none"],
    "b512-e8-ffa": ["client.lr=0.002", "privacy.max_grad_norm=1"],
    "b512-e3-ffa": ["client.lr=0.002", "privacy.max_grad_norm=1", "privacy.target_epsilon=3"],
    "b512-e1-ffa": ["client.lr=0.002", "privacy.max_grad_norm=1", "privacy.target_epsilon=1"],
    "b512-clip-ffa": [
        "client.lr=0.002",
        "privacy.max_grad_norm=1",
        "privacy.target_epsilon=null",
        "privacy.noise_multiplier=0",
    ],
    # a 5x learning rate
    "b512-none-ffa-lr1e-2": ["client.lr=0.01", "privacy.max_grad_norm=1", "privacy.mode=none"],
    "b512-e8-ffa-lr1e-2": ["client.lr=0.01", "privacy.max_grad_norm=1"],
    # a clip of 10, above every per-example gradient norm (the first sweep's recipe)
    "c10-clip-only": [*OLD, "privacy.target_epsilon=null", "privacy.noise_multiplier=0"],
    "c10-e8": OLD,
    "c10-e3": [*OLD, "privacy.target_epsilon=3"],
    "c10-e1": [*OLD, "privacy.target_epsilon=1"],
    "c10-e8-fedit": [*OLD, "strategy.name=fedit"],
    "c10-none-fedit": [*OLD, "strategy.name=fedit", "privacy.mode=none"],
    "c3-e8": [*OLD, "privacy.max_grad_norm=3"],
    "c10-e8-r2": [*OLD, "adapter.r=2"],
    "c10-e8-b1024": [*OLD, "client.batch_size=1024", "client.local_steps=1"],
    # a smaller LoRA scale, to keep noisy B steps from disturbing the encoder: not the problem
    "a2-e8": [*OLD, "adapter.alpha=2"],
    "a2-none": [*OLD, "adapter.alpha=2", "privacy.mode=none"],
    "a05-e8": [*OLD, "adapter.alpha=0.5"],
    # the clip against the per-example gradient norms (median 1.18, 90th percentile 1.25): the finding
    "c1-e8": [*OLD, "privacy.max_grad_norm=1"],
    "c12-e8": [*OLD, "privacy.max_grad_norm=1.2"],
    "c15-e8": [*OLD, "privacy.max_grad_norm=1.5"],
    "c15-e3": [*OLD, "privacy.max_grad_norm=1.5", "privacy.target_epsilon=3"],
    "c15-e8-fedit": [*OLD, "privacy.max_grad_norm=1.5", "strategy.name=fedit"],
    "c15-a05-e8": [*OLD, "privacy.max_grad_norm=1.5", "adapter.alpha=0.5"],
    "c15-a05-none": [*OLD, "privacy.max_grad_norm=1.5", "adapter.alpha=0.5", "privacy.mode=none"],
    "c3-a05-e8": [*OLD, "privacy.max_grad_norm=3", "adapter.alpha=0.5"],
    # the recipe: clip 1.5 and AdamW 2e-2
    "recipe-none": ["privacy.mode=none"],
    "recipe-e8": [],
    "recipe-e8-seed1": ["seed=1"],
    "recipe-e3": ["privacy.target_epsilon=3"],
    "recipe-e1": ["privacy.target_epsilon=1"],
    "recipe-e8-fedit": ["strategy.name=fedit"],
    "recipe-none-fedit": ["strategy.name=fedit", "privacy.mode=none"],
}
PROXY = [
    "federation.clients=1", "federation.min_clients=1", "data.partition.kind=iid", "federation.eval_every=0",
    "output.plots=false", "federation.rounds=10", "client.local_steps=2",  # the sweep's 20 steps, as it ran
]  # fmt: skip


def fedtune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=REPO, text=True, capture_output=True)


def iid_share(out: Path) -> Path:
    parts = out / "iid-parts"
    if not parts.exists():
        done = fedtune("partition", CONFIG, "--set", "data.partition.kind=iid", "--out", str(parts))
        if done.returncode != 0:
            raise SystemExit(done.stderr)
    return parts / "client-0.jsonl"


def point(out: Path, name: str, overrides: list[str], part: Path) -> dict:
    from fedtune.cli.resolve import resolve
    from fedtune.core.config import load_config
    from fedtune.core.dp_accounting import noise_to_signal
    from fedtune.engine.adapters import coordinates_by_role
    from fedtune.strategies import strategy_class

    run = out / "runs" / name
    settings = [f"data.train={part}", *PROXY, *overrides]
    if not (run / "summary.json").exists():
        command = ["train", CONFIG, "--out", str(run)] + [arg for o in settings for arg in ("--set", o)]
        print(f"{name}: fedtune {' '.join(command)}", flush=True)
        done = fedtune(*command)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr[-2000:]}")
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = resolve(load_config(CONFIG, settings), name_hint="sweep", need_train_data=False)
    roles = strategy_class(config).plan.sent
    sizes = coordinates_by_role(config, ["0", "1"])
    coordinates = sum(sizes[r] for r in roles)
    noise = records[-1].get("noise_multiplier")
    examples = sum(1 for _ in part.open())
    ratio = noise_to_signal(noise, coordinates, config.client.batch_size) if noise else 0.0
    return {
        "point": name,
        "strategy": config.strategy.name,
        "batch": config.client.batch_size,
        "steps": config.federation.rounds * config.client.local_steps,
        "lr": config.client.lr,
        "r": config.adapter.r,
        "alpha": config.adapter.alpha,
        "clip": config.privacy.max_grad_norm,
        "epsilon": records[-1].get("epsilon"),
        "noise_multiplier": noise,
        "coordinates": coordinates,
        "noise_to_signal": round(ratio, 3),
        "examples": examples,
        "eval_accuracy": summary["final"]["eval_accuracy"],
        "wall_s": summary.get("wall_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=None, help="comma-separated point names")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    part = iid_share(args.out)
    names = args.only.split(",") if args.only else list(POINTS)
    results = []
    for name in names:
        results.append(point(args.out, name, POINTS[name], part))
        print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nclient data: {part.name}, {results[0]['examples']} rows\n")
    print("| point | strategy | batch | steps | lr | clip | r | α | ε | σ | noised coordinates | noise/signal | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        sigma = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        print(
            f"| {r['point']} | {r['strategy']} | {r['batch']} | {r['steps']} | {r['lr']:g} | {r['clip']:g} | {r['r']} | {r['alpha']:g} | {eps} "
            f"| {sigma} "
            f"| {r['coordinates']:,} | {r['noise_to_signal']:.2f} | {100 * r['eval_accuracy']:.1f}% |"
        )


if __name__ == "__main__":
    main()
