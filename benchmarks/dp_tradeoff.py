"""Accuracy against ε for FedIT and FFA-LoRA at both DP levels, one simulation per point.

Every point is a ``fedtune simulate`` of the same config (SST-2, MiniLM-L6, 10 clients,
Dirichlet 0.5) with ``privacy.target_epsilon`` set, so the noise is calibrated for the
planned rounds; ε = ∞ is the same run without DP. ``--wiring`` adds two runs with noise
0 and a clip no update reaches, to show that the DP wiring alone leaves training unchanged.
Writes ``results.json``, ``table.md`` and ``dp-tradeoff.png`` under ``--out``.

    python benchmarks/dp_tradeoff.py --out /tmp/dp --rounds 12
    python benchmarks/dp_tradeoff.py --config simulations/configs/sst2-dp.yaml --levels sample --rounds 10 --out /tmp/dp-recipe
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "simulations/configs/sst2-minilm.yaml"
EPSILONS = (1.0, 3.0, 8.0)
LEVELS = ("sample", "client")


def runs(strategies: list[str], levels: list[str], wiring: bool) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every point, baselines first."""
    points = [(f"{strategy}-none-inf", [f"strategy.name={strategy}", "privacy.mode=none"]) for strategy in strategies]
    for level in levels:  # the clip norm comes from the config (default 1.0)
        for epsilon in sorted(EPSILONS, reverse=True):  # the goal's ε = 8 first
            for strategy in strategies:
                overrides = [f"strategy.name={strategy}", f"privacy.mode={level}", f"privacy.target_epsilon={epsilon}"]
                points.append((f"{strategy}-{level}-{epsilon:g}", overrides))
    for level in levels if wiring else ():  # the wiring check: DP machinery on, no noise, no clipping
        unclipped = "privacy.max_grad_norm=1e6" if level == "sample" else "privacy.clip_norm=1e6"
        overrides = ["strategy.name=fedit", f"privacy.mode={level}", "privacy.noise_multiplier=0", unclipped]
        points.append((f"fedit-{level}-noise0", overrides))
    return points


def simulate(config: str, name: str, overrides: list[str], common: list[str], out: Path) -> dict:
    args = [sys.executable, "-m", "fedtune.cli", "simulate", config, "--out", str(out / name)]
    for assignment in [*common, *overrides]:
        args += ["--set", assignment]
    started = time.time()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    summary = json.loads((out / name / "summary.json").read_text())
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "accuracy": summary["final"].get("eval_accuracy"),
        "epsilon": records[-1].get("epsilon", "none"),
        "noise_multiplier": records[-1].get("noise_multiplier"),
        "rounds": len(records),
        "status": summary["status"],
        "wall_s": round(time.time() - started, 1),
    }


def table(results: dict[str, dict], strategies: list[str], levels: list[str]) -> str:
    lines = ["| strategy | DP level | ε = 1 | ε = 3 | ε = 8 | ε = ∞ (no DP) |", "|---|---|---|---|---|---|"]
    for strategy in strategies:
        baseline = results[f"{strategy}-none-inf"]["accuracy"]
        for level in levels:
            points = [results.get(f"{strategy}-{level}-{e:g}") for e in EPSILONS]
            cells = [f"{point['accuracy']:.2%}" if point else "not run" for point in points]
            lines.append(f"| {strategy} | {level} | {' | '.join(cells)} | {baseline:.2%} |")
    for level in levels:  # --wiring: noise 0, no clipping, against the same strategy without DP
        point = results.get(f"fedit-{level}-noise0")
        if point:
            baseline = results["fedit-none-inf"]["accuracy"]
            lines.append(f"\nfedit, {level} level, noise 0, clip 1e6: {point['accuracy']:.2%} (no DP {baseline:.2%})")
    return "\n".join(lines)


def plot(results: dict[str, dict], strategies: list[str], levels: list[str], target: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(levels), figsize=(5.5 * len(levels), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for axis, level in zip(axes, levels):
        for strategy in strategies:
            points = [(e, results.get(f"{strategy}-{level}-{e:g}")) for e in EPSILONS]
            epsilons, accuracy = zip(*[(e, point["accuracy"]) for e, point in points if point]) or ((), ())
            (line,) = axis.plot(epsilons, accuracy, marker="o", label=f"{strategy}")
            axis.axhline(results[f"{strategy}-none-inf"]["accuracy"], color=line.get_color(), ls="--", lw=1)
        axis.set(xscale="log", xlabel="ε (δ = 1e-5)", title=f"{level}-level DP", xticks=EPSILONS)
        axis.set_xticklabels([f"{e:g}" for e in EPSILONS])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(alpha=0.3)
        axis.legend(title="dashed: no DP")
    axes[0].set_ylabel("SST-2 dev accuracy")
    fig.suptitle("SST-2, MiniLM-L6 + LoRA, 10 clients, Dirichlet 0.5")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--levels", default="sample,client")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--strategies", default="fedit,ffa")
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--wiring", action="store_true", help="add fedit runs with noise 0 and no clipping")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from results.json")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    common = [
        f"federation.rounds={args.rounds}",
        "federation.eval_every=0",
        f"data.eval_max_examples={args.eval_examples}",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    levels = args.levels.split(",")
    for name, overrides in runs(strategies, levels, args.wiring):
        if name in results or args.report:  # finished in an earlier invocation
            continue
        results[name] = simulate(args.config, name, overrides, common, args.out)
        store.write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    (args.out / "table.md").write_text(table(results, strategies, levels) + "\n")
    plot(results, strategies, levels, args.out / "dp-tradeoff.png")
    print(table(results, strategies, levels))


if __name__ == "__main__":
    main()
