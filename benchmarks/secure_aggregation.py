"""Secure aggregation (``federation.secure_aggregation: secagg+``) against the same runs in the clear.

Three measurements, each a set of ``fedtune simulate`` runs on identical seeds and partitions,
side by side in one invocation (run it alone: two CPU-heavy jobs on 2 cores distort the seconds):

- ``accuracy``: SST-2, MiniLM-L6, 10 clients (``simulations/configs/sst2-minilm.yaml``), 12
  rounds, fedit and ffa, each with and without secure aggregation: final accuracy on all
  6,735 rows of sst2/dev.tsv, the clipped-coordinate count (is ±c wide enough), wall time.
- ``scale``: the quickstart at 10 and 100 simulated clients, one local step, 2 rounds, FFA:
  bytes per client-round up and down, and seconds per round (the second round: no model loads),
  with and without secure aggregation.
- ``hostile``: SST-2, fedit, 6 rounds under secure aggregation with ``benchmarks/hostile_app``:
  clean; the 10⁶-count liar with its update at 0.5 everywhere and the ×10⁴ sign-flipper, both
  bypassing the client's clip (``-edge``: every coordinate at the edge of the coordinator's range
  check, as a member speaking the Fleet API can; through fedtune's own client the clip to ±c
  would bound them like an honest client).

    python benchmarks/secure_aggregation.py accuracy --out /tmp/secagg-bench
    python benchmarks/secure_aggregation.py scale --out /tmp/secagg-bench
    python benchmarks/secure_aggregation.py hostile --out /tmp/secagg-bench

Writes ``<part>.json`` (resumable: finished runs are skipped) and ``<part>.md`` under ``--out``.
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
SST2 = "simulations/configs/sst2-minilm.yaml"
QUICKSTART = "simulations/configs/quickstart.yaml"
APP = REPO / "benchmarks" / "hostile_app"
SECURE = "federation.secure_aggregation=secagg+"


def simulate(config: str, name: str, overrides: list[str], out: Path, attacks: dict | None = None) -> dict:
    args = [sys.executable, "-m", "fedtune.cli", "simulate", config, "--out", str(out / name)]
    args += ["--app", str(APP)] if attacks is not None else []
    for assignment in overrides:
        args += ["--set", assignment]
    env = {**os.environ, "FEDTUNE_ATTACKS": json.dumps(attacks or {})}
    started = time.time()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if not (out / name / "summary.json").is_file():
        return {"accuracy": None, "status": f"failed (exit {result.returncode})", "error": result.stderr[-800:]}
    summary = json.loads((out / name / "summary.json").read_text())
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "accuracy": summary["final"].get("eval_accuracy"),
        "status": summary["status"],
        "records": records,
        "wall_s": round(time.time() - started, 1),
    }


def run_all(part: str, runs: dict[str, tuple[str, list[str], dict | None]], out: Path) -> dict:
    store = out / f"{part}.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for name, (config, overrides, attacks) in runs.items():
        if name not in results:
            results[name] = simulate(config, name, overrides, out, attacks)
            store.write_text(json.dumps(results, indent=1))
            print(f"{name}: accuracy {results[name]['accuracy']}, {results[name]['wall_s']} s", flush=True)
    return results


def accuracy(out: Path) -> str:
    common = ["federation.rounds=12", "federation.eval_every=0", "output.plots=false"]
    runs = {
        f"{strategy}-{mode}": (SST2, [*common, f"strategy.name={strategy}", *([SECURE] if mode == "secagg" else [])], None)
        for strategy in ("fedit", "ffa")
        for mode in ("plain", "secagg")
    }
    results = run_all("accuracy", runs, out)
    lines = ["| strategy | in the clear | secagg+ | difference | clipped coordinates (secagg+, all rounds) | wall clear / secagg+ |"]
    lines.append("|---|---|---|---|---|---|")
    for strategy in ("fedit", "ffa"):
        plain, secure = results[f"{strategy}-plain"], results[f"{strategy}-secagg"]
        if plain["accuracy"] is None or secure["accuracy"] is None:
            lines.append(f"| {strategy} | {plain['status']} | {secure['status']} | | | |")
            continue
        clipped = sum(r.get("secagg_clipped", 0) for r in secure["records"])
        diff = 100 * (secure["accuracy"] - plain["accuracy"])
        lines.append(
            f"| {strategy} | {plain['accuracy']:.2%} | {secure['accuracy']:.2%} | {diff:+.2f} points | {clipped} | "
            f"{plain['wall_s']:.0f} s / {secure['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def scale(out: Path) -> str:
    runs = {}
    for clients in (10, 100):
        common = [
            "strategy.name=ffa", f"federation.clients={clients}", "federation.rounds=2", "federation.eval_every=0",
            "client.local_steps=1", "data.partition.kind=iid", "data.eval_max_examples=50", "output.plots=false",
            f"federation.min_clients={max(3, clients // 2)}",
        ]  # fmt: skip
        for mode in ("plain", "secagg"):
            runs[f"{clients}-{mode}"] = (QUICKSTART, [*common, *([SECURE] if mode == "secagg" else [])], None)
    results = run_all("scale", runs, out)
    lines = ["| clients | mode | up / client-round | down / client-round | seconds, round 2 | of which key and share exchanges |"]
    lines.append("|---|---|---|---|---|---|")
    for name, point in results.items():
        clients, mode = name.split("-")
        if point["accuracy"] is None:
            lines.append(f"| {clients} | {mode} | {point['status']} | | | |")
            continue
        last = point["records"][-1]
        up, down = last["bytes_up"] / last["clients"], last["bytes_down"] / last["sampled"]
        stages = f"{last['secagg_s']:.1f} s" if "secagg_s" in last else ""
        lines.append(f"| {clients} | {mode} | {up / 1e3:.1f} KB | {down / 1e3:.1f} KB | {last['wall_s']:.1f} s | {stages} |")
    return "\n".join(lines)


def hostile(out: Path) -> str:
    common = ["strategy.name=fedit", "federation.rounds=6", "federation.eval_every=0", "data.eval_max_examples=1000"]
    common += ["output.plots=false", SECURE]
    scenarios = {
        "clean": {},
        "liar-edge": {"0": "liar-edge"},
        "signflip-edge": {"1": "signflip-edge"},
    }
    runs = {name: (SST2, common, attacks) for name, attacks in scenarios.items()}
    results = run_all("hostile", runs, out)
    clean = results["clean"]["accuracy"]
    lines = ["| secagg+, one hostile client | final accuracy | against clean | weights capped |", "|---|---|---|---|"]
    for name, point in results.items():
        if point["accuracy"] is None:
            lines.append(f"| {name} | {point['status']} | | |")
            continue
        capped = sum(r.get("robust_capped", 0) for r in point["records"])
        lines.append(f"| {name} | {point['accuracy']:.2%} | {100 * (point['accuracy'] - clean):+.1f} points | {capped} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["accuracy", "scale", "hostile"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = {"accuracy": accuracy, "scale": scale, "hostile": hostile}[args.part](args.out)
    (args.out / f"{args.part}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
