"""Memory of a simulated federation at 10, 100 and 1,000 clients (issue 18: cross-device scale).

Each point runs ``fedtune simulate`` on SST-2 (IID shares of ``sst2/train.tsv``: 6,000 rows
per client at 10 clients, 60 at 1,000) with 10 clients per round (``federation.fraction``
= 10 / clients), 2 rounds of one local step, and samples the proportional set size (PSS:
shared pages split between the processes that share them) of the whole process tree every
0.5 s: the CLI, the SuperLink, the ServerApp, Ray's head processes and its client actors.
Peak = the largest sum seen. What could grow with the number of clients does not: partitions
are index lists over one copy of the rows, Ray's actor pool has one actor per
``simulation.client_cpus`` cores whatever the number of clients, each client's state lives in
its own directory on disk, and a process caches at most 64 clients' tokenised data.

    python benchmarks/scale_memory.py --out /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SST2 = REPO.parent / "shared" / "data" / "sst2"
PER_ROUND = 10


def tree_pss_mb(root: psutil.Process) -> float:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def point(clients: int, out: Path) -> dict:
    run = out / f"clients-{clients}"
    settings = [
        f"federation.clients={clients}", f"federation.fraction={PER_ROUND / clients}", f"federation.min_clients={PER_ROUND}",
        "federation.rounds=2", "federation.eval_every=1", "client.local_steps=1", "client.batch_size=16",
        "data.partition.kind=iid", "data.eval_max_examples=200", "simulation.client_cpus=1", "output.plots=false",
    ]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "simulate",
        "simulations/configs/sst2-minilm.yaml",
        "--out",
        str(run),
    ]
    command += [arg for setting in settings for arg in ("--set", setting)]
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, samples = psutil.Process(process.pid), []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(tree_pss_mb(root))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{clients} clients: exit {process.returncode}\n{output[-3000:]}")
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        "clients": clients,
        "clients_per_round": [r["clients"] for r in records],
        "peak_pss_mb": round(max(samples), 1),
        "wall_s": round(time.time() - started, 1),
        "status": summary["status"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clients", default="10,100,1000")
    args = parser.parse_args()
    if not (SST2 / "train.tsv").is_file():
        raise SystemExit(f"{SST2 / 'train.tsv'}: needed (../shared/data)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for clients in (int(c) for c in args.clients.split(",")):
        results.append(point(clients, args.out))
        print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    reference = next((r for r in results if r["clients"] == 100), results[0])
    print("\n| clients | clients per round | peak PSS of the process tree | vs 100 clients | wall |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']:,} | {'/'.join(map(str, r['clients_per_round']))} | {r['peak_pss_mb']:,.0f} MB "
            f"| {r['peak_pss_mb'] / reference['peak_pss_mb']:.2f}× | {r['wall_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
