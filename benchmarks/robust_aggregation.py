"""Final accuracy of each ``strategy.robust`` setting, clean and with hostile clients.

Every point is a ``fedtune simulate`` of SST-2 with MiniLM-L6 and 10 clients
(``simulations/configs/sst2-minilm.yaml``, Dirichlet 0.5, shortened to ``--rounds``) through
``benchmarks/hostile_app``, whose ClientApp trains honestly and then rewrites the train
reply of the partitions named in ``FEDTUNE_ATTACKS``, every round:

- ``liar``: partition 0 claims 10⁶× its examples (at most 10⁹) and sends every tensor = 0.5;
- ``signflip``: partition 1 sends (sent − broadcast) × (−10⁴) + broadcast;
- ``both``: the two together.

Each robust setting (none, norm-bound = the default, trimmed-mean, median) runs clean and
under each attack, on identical seeds and partitions, so each row's clean run is its baseline.
Writes ``results.json`` (resumable: finished points are skipped) and ``table.md`` under ``--out``.

    python benchmarks/robust_aggregation.py --out /tmp/robust-bench --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "simulations/configs/sst2-minilm.yaml"
APP = REPO / "benchmarks" / "hostile_app"
SETTINGS = ("none", "norm-bound", "trimmed-mean", "median")
SCENARIOS = {
    "clean": {},
    "liar": {"0": "liar"},
    "signflip": {"1": "signflip"},
    "both": {"0": "liar", "1": "signflip"},
}
DEFAULT = "norm-bound"


def simulate(name: str, overrides: list[str], attacks: dict[str, str], out: Path) -> dict:
    args = [sys.executable, "-m", "fedtune.cli", "simulate", CONFIG, "--app", str(APP), "--out", str(out / name)]
    for assignment in overrides:
        args += ["--set", assignment]
    env = {**os.environ, "FEDTUNE_ATTACKS": json.dumps(attacks)}
    started = time.time()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    summary_path = out / name / "summary.json"
    if not summary_path.is_file():  # a run that could not finish (e.g. every reply rejected as non-finite)
        return {"accuracy": None, "status": f"failed (exit {result.returncode})", "error": result.stderr[-500:]}
    summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "accuracy": summary["final"].get("eval_accuracy"),
        "eval_loss": summary["final"].get("eval_loss"),
        "status": summary["status"],
        "rounds": len(records),
        "clipped": sum(r.get("robust_clipped", 0) for r in records),
        "capped": sum(r.get("robust_capped", 0) for r in records),
        "rejected": sum(len(r.get("rejected", [])) for r in records),
        "wall_s": round(time.time() - started, 1),
    }


def cell(point: dict | None, clean: dict | None) -> str:
    if point is None:
        return "not run"
    if point["accuracy"] is None:
        return point["status"]
    text = f"{point['accuracy']:.2%}"
    if clean and clean.get("accuracy") is not None and point is not clean:
        text += f" ({100 * (point['accuracy'] - clean['accuracy']):+.1f})"
    if point["status"] != "completed":
        text += f" [{point['status']}]"
    return text


def table(results: dict[str, dict], scenarios: list[str]) -> str:
    header = "| strategy.robust | " + " | ".join(scenarios) + " |"
    lines = [header, "|---" * (len(scenarios) + 1) + "|"]
    for setting in SETTINGS:
        clean = results.get(f"{setting}-clean")
        cells = [cell(results.get(f"{setting}-{scenario}"), clean) for scenario in scenarios]
        lines.append(f"| {setting}{' (default)' if setting == DEFAULT else ''} | {' | '.join(cells)} |")
    lines.append("\n(in parentheses: points against the same setting's clean run)")
    clean = results.get(f"{DEFAULT}-clean")
    for scenario in scenarios[1:]:
        point = results.get(f"{DEFAULT}-{scenario}")
        if clean and point and point["accuracy"] is not None:
            gap = 100 * (clean["accuracy"] - point["accuracy"])
            verdict = "holds" if gap <= 2.0 else "does not hold"
            below = f"{gap:.1f} points below its clean run" if gap >= 0 else f"{-gap:.1f} points above its clean run"
            lines.append(f"\n{DEFAULT} under {scenario}: {below}; the 2-point goal {verdict}")
    counts = [
        f"{name}: clipped {point['clipped']}, capped {point['capped']}"
        for name, point in results.items()
        if point.get("accuracy") is not None and name.split("-")[-1] != "clean"
    ]
    if counts:
        lines.append("\nupdates clipped / weights capped over the run: " + "; ".join(counts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--strategy", help="strategy.name for every run (default: the config's)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, clean first")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--report", action="store_true", help="only write the table from results.json")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    common = [
        *([f"strategy.name={args.strategy}"] if args.strategy else []),
        f"federation.rounds={args.rounds}",
        "federation.eval_every=0",
        f"data.eval_max_examples={args.eval_examples}",
        "output.plots=false",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for scenario in scenarios:  # every setting's clean run first, the combined attack last
        for setting in SETTINGS:
            name = f"{setting}-{scenario}"
            if name in results or args.report:  # finished in an earlier invocation
                continue
            results[name] = simulate(name, [*common, f"strategy.robust={setting}"], SCENARIOS[scenario], args.out)
            store.write_text(json.dumps(results, indent=1))
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    (args.out / "table.md").write_text(table(results, scenarios) + "\n")
    print(table(results, scenarios))


if __name__ == "__main__":
    main()
