"""Client-level DP against the number of clients per round (issue 18: cross-device scale).

DP-FedAvg's noise on the round's mean is σ·C / (clients per round), while the privacy cost of
a round grows only slowly with the sampling rate q = clients per round / clients. So at a fixed
ε, more clients per round means less noise on the model. Every point is one ``fedtune
simulate`` of ``simulations/configs/sst2-dp-client.yaml`` (1,000 simulated clients) with
``federation.fraction`` = per-round / clients, at client-level ε (σ calibrated by fedtune for
the planned rounds at that q) and without DP. A point whose run directory already holds a
``summary.json`` is read, not rerun, so several invocations can share the work. Writes
``table.md`` and ``dp-clients.png`` under ``--out``.

    python benchmarks/dp_clients.py --out /tmp/dp-clients --per-round 10,50,200 --strategy-set fedit:privacy.clip_norm=2.8
    python benchmarks/dp_clients.py --out /tmp/dp-clients --per-round 10,50,200 --report
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "simulations/configs/sst2-dp-client.yaml"


def point_name(strategy: str, per_round: int, epsilon: float | None) -> str:
    return f"{strategy}-m{per_round}-{'none' if epsilon is None else f'eps{epsilon:g}'}"


def overrides(strategy: str, per_round: int, clients: int, epsilon: float | None, extra: list[str]) -> list[str]:
    privacy = ["privacy.mode=none"] if epsilon is None else ["privacy.mode=client", f"privacy.target_epsilon={epsilon}"]
    return [f"strategy.name={strategy}", f"federation.fraction={per_round / clients}", *privacy, *extra]


def simulate(config: str, run: Path, settings: list[str]) -> None:
    args = [sys.executable, "-m", "fedtune.cli", "simulate", config, "--out", str(run)]
    for assignment in settings:
        args += ["--set", assignment]
    started = time.time()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{run.name} failed:\n{result.stderr[-2000:]}")
    print(f"{run.name}: {time.time() - started:.0f} s", flush=True)


def read_point(run: Path) -> dict | None:
    """Final accuracy, σ, ε and the median number of clients a round of RUN heard from."""
    if not (run / "summary.json").exists():
        return None
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    private = run / "logs" / "private-metrics.jsonl"  # under client-level DP the counts are kept off metrics.jsonl
    rows = [json.loads(line) for line in private.read_text().splitlines()] if private.exists() else records
    heard = sorted(record["clients"] for record in rows)
    return {
        "accuracy": summary["final"]["eval_accuracy"],
        "noise_multiplier": records[-1].get("noise_multiplier"),
        "epsilon": records[-1].get("epsilon"),
        "median_clients": heard[len(heard) // 2],
        "rounds": len(records),
        "wall_s": summary["wall_s"],
    }


def table(results: dict[str, dict | None], strategies: list[str], per_round: list[int], epsilon: float) -> str:
    lines = [
        f"| strategy | clients per round | σ | no DP | client-level ε = {epsilon:g} | gap |",
        "|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        for m in per_round:
            private, baseline = results[point_name(strategy, m, epsilon)], results[point_name(strategy, m, None)]
            sigma = f"{private['noise_multiplier']:.3f}" if private else ""
            cells = [f"{p['accuracy']:.2%}" if p else "not run" for p in (baseline, private)]
            gap = f"{100 * (baseline['accuracy'] - private['accuracy']):.1f} points" if private and baseline else ""
            lines.append(f"| {strategy} | {m} | {sigma} | {cells[0]} | {cells[1]} | {gap} |")
    return "\n".join(lines)


def plot(results: dict[str, dict | None], strategies: list[str], per_round: list[int], epsilon: float, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for strategy in strategies:
        color = None
        for eps, style in ((epsilon, "-"), (None, "--")):
            points = [(m, results[point_name(strategy, m, eps)]) for m in per_round]
            points = [(m, point["accuracy"]) for m, point in points if point]
            if not points:
                continue
            label = f"{strategy}, {'no DP' if eps is None else f'ε = {eps:g}'}"
            (line,) = axis.plot(*zip(*points), style, marker="o", label=label, color=color)
            color = line.get_color()
    axis.set(xscale="log", xlabel="clients per round (of 1,000)", ylabel="SST-2 dev accuracy")
    axis.set_xticks(per_round, [str(m) for m in per_round])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("Client-level DP-FedAvg, SST-2, MiniLM-L6")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--clients", type=int, default=1000, help="federation.clients of the config")
    parser.add_argument("--per-round", default="10,50,200,500", help="expected clients per round, comma-separated")
    parser.add_argument("--strategies", default="ffa,fedit")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument(
        "--strategy-set",
        action="append",
        default=[],
        metavar="STRATEGY:KEY=VALUE",
        help="an override for one strategy's runs, e.g. fedit:privacy.clip_norm=2.8 (FedIT sends A too)",
    )
    parser.add_argument("--only", default="", help="run only these point names (comma-separated); report all")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the run directories")
    args = parser.parse_args()
    strategies, per_round = args.strategies.split(","), [int(m) for m in args.per_round.split(",")]
    only = set(filter(None, args.only.split(",")))
    extra: dict[str, list[str]] = {}
    for setting in args.strategy_set:
        strategy, _, assignment = setting.partition(":")
        extra.setdefault(strategy, []).append(assignment)
    args.out.mkdir(parents=True, exist_ok=True)
    for m in per_round:  # small federations first: they are quick and say early whether anything learns
        for strategy in strategies:
            for eps in (args.epsilon, None):
                name = point_name(strategy, m, eps)
                if args.report or (only and name not in only) or read_point(args.out / name):
                    continue
                simulate(args.config, args.out / name, overrides(strategy, m, args.clients, eps, extra.get(strategy, [])))
    results = {
        point_name(s, m, eps): read_point(args.out / point_name(s, m, eps))
        for s in strategies
        for m in per_round
        for eps in (args.epsilon, None)
    }
    (args.out / "table.md").write_text(table(results, strategies, per_round, args.epsilon) + "\n")
    plot(results, strategies, per_round, args.epsilon, args.out / "dp-clients.png")
    print(table(results, strategies, per_round, args.epsilon))


if __name__ == "__main__":
    main()
