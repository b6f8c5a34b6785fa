"""Per-round wall time: deployment on loopback vs simulation of the same config, in one run.

Both runs use the same config, partitions and seeds. The simulation is ``fedtune simulate``
(SuperLink + Simulation Engine); the deployment is ``fedtune coordinator`` with TLS and
agent authentication plus one ``fedtune client`` agent process per client, all on this
machine (each agent gets cores / clients threads, as the README advises). The per-round
time is what the coordinator records in metrics.jsonl (``wall_s``: send, train, aggregate,
evaluate, checkpoint).

Runs are noisy on a shared 2-core machine (±0.1 in the ratio between runs), so the two are
run alternately REPEATS times and the median over pairs is the result; every pair is kept.

    python benchmarks/deployment_overhead.py --clients 3 --rounds 8 --repeats 3 --out /tmp/deploy-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedtune.core.processes import free_port  # noqa: E402


def fedtune(*args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    command = [sys.executable, "-m", "fedtune.cli", *args]
    return subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def check(process: subprocess.Popen, what: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{what} failed (exit {process.returncode})")


def round_times(run: Path) -> list[float]:
    return [json.loads(line)["wall_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="simulations/configs/quickstart.yaml")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="simulation/deployment pairs, run alternately")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    overrides: list[str] = []
    for item in [
        f"federation.clients={args.clients}",
        f"federation.min_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"client.local_steps={args.local_steps}",
        "data.partition.kind=iid",
        "output.plots=false",
        *args.extra,
    ]:
        overrides += ["--set", item]

    check(fedtune("partition", args.config, *overrides, "--out", str(args.out / "data")), "partition")
    check(fedtune("certs", str(args.out / "certs")), "certs")
    for index in range(args.clients):
        check(fedtune("keygen", str(args.out / "keys" / f"client-{index}")), "keygen")

    print("| pair | simulation, median round | deployment, median round | ratio of medians | ratio of means |")
    print("|---|---|---|---|---|", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.clients)
    pairs = []
    for repeat in range(1, args.repeats + 1):
        out = args.out / f"pair-{repeat}"
        simulation_total = simulate(args, overrides, out / "simulation")
        deployment_total = deploy(args, overrides, out / "deployment", threads)
        simulated, deployed = round_times(out / "simulation"), round_times(out / "deployment")
        pair = {
            "simulation_round_s": simulated,
            "deployment_round_s": deployed,
            "simulation_median_round_s": statistics.median(simulated),
            "deployment_median_round_s": statistics.median(deployed),
            "ratio_median_round": statistics.median(deployed) / statistics.median(simulated),
            "ratio_mean_round": statistics.mean(deployed) / statistics.mean(simulated),
            "simulation_total_s": round(simulation_total, 1),
            "deployment_total_s": round(deployment_total, 1),
        }
        pairs.append(pair)
        print(
            f"| {repeat} | {pair['simulation_median_round_s']:.2f} s | {pair['deployment_median_round_s']:.2f} s "
            f"| {pair['ratio_median_round']:.2f}x | {pair['ratio_mean_round']:.2f}x |",
            flush=True,
        )
    ratios = [pair["ratio_median_round"] for pair in pairs]
    result = {
        "config": args.config,
        "overrides": args.extra,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "agent_threads": threads,
        "pairs": pairs,
        "ratio_median_round_per_pair": ratios,
        "ratio_median_over_pairs": statistics.median(ratios),
    }
    (args.out / "deployment_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"median round, deployment / simulation, median over {len(pairs)} pairs: {statistics.median(ratios):.2f}x")


def simulate(args: argparse.Namespace, overrides: list[str], out: Path) -> float:
    """``fedtune simulate`` of the config; its wall time."""
    started = time.time()
    check(fedtune("simulate", args.config, *overrides, "--out", str(out)), "simulate")
    return time.time() - started


def deploy(args: argparse.Namespace, overrides: list[str], out: Path, threads: int) -> float:
    """Coordinator (TLS, agent keys) plus one agent per client with THREADS threads, on loopback; wall time."""
    address = f"127.0.0.1:{free_port()}"
    out.mkdir(parents=True)
    log = out.parent / "coordinator.log"
    started = time.time()
    coordinator = fedtune(
        "coordinator", args.config, *overrides, "--address", address, "--out", str(out),
        "--certs", str(args.out / "certs"), "--authorized-keys", str(args.out / "keys"), log=log,
    )  # fmt: skip
    while "waiting for" not in log.read_text():  # keys registered: agents may join
        if coordinator.poll() is not None:
            raise SystemExit(f"coordinator failed: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    agents = [
        fedtune(
            "client",
            "--coordinator",
            address,
            "--name",
            f"client-{i}",
            "--threads",
            str(threads),
            "--data",
            str(args.out / "data" / f"client-{i}.jsonl"),
            "--state-dir",
            str(out.parent / "agents" / str(i)),
            "--ca-cert",
            str(args.out / "certs" / "ca.crt"),
            "--key",
            str(args.out / "keys" / f"client-{i}"),
            log=out.parent / f"agent-{i}.log",
        )  # fmt: skip
        for i in range(args.clients)
    ]
    check(coordinator, "coordinator")
    total = time.time() - started
    for agent in agents:
        agent.terminate()
        agent.wait()
    return total


if __name__ == "__main__":
    main()
