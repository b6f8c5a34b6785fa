"""One base plus an adapter per client against one merged model per client: bytes, switching, latency.

Exports a personalised (FedSA) run twice: ``--clients all`` (one unmerged base, adapters as
inputs) and, for one client, ``--client NAME`` (merged). Measures the bundle bytes of each
against N merged bundles, the time ``Bundle.with_client`` takes to switch adapters (the first
switch to each client reads and checks its files; later ones pick the checked arrays: median
and max of each, over every client, many rounds), and batch-1 latency of the adapter bundle against the
merged bundle for the same client (p50 over the check texts, interleaved, one thread).

    fedtune simulate simulations/configs/quickstart.yaml --set strategy.name=fedsa --out /tmp/fedsa-run
    python benchmarks/adapter_bundle.py /tmp/fedsa-run --out /tmp/adapter-bundle
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fedtune.core.records import read_records
from fedtune.core.rundir import RunDir
from fedtune.edge import Bundle
from fedtune.edge.adapters import export_adapter_bundle
from fedtune.edge.export import export_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=200)
    args = parser.parse_args()
    run = RunDir.open(args.run)
    quiet = lambda *_: None  # noqa: E731
    adapters = export_adapter_bundle(run, args.out / "adapters", check_examples=100, echo=quiet)
    client = adapters["adapters"]["clients"][1]
    merged = export_bundle(run, args.out / "merged", client=client, check_examples=100, echo=quiet)
    clients = adapters["adapters"]["clients"][1:]  # the real clients, without "global"
    files = adapters["sizes"]["files"]
    adapter_bytes = sum(v for k, v in files.items() if k.startswith("adapters/"))
    one_merged = merged["sizes"]["model_bytes"]

    bundle = Bundle.load(args.out / "adapters", threads=1)
    first, switches = [], []
    for round_number in range(21):
        for name in clients:
            started = time.perf_counter()
            bundle.with_client(name)
            (first if round_number == 0 else switches).append(time.perf_counter() - started)

    config = run.config()
    texts = [str(r[config.data.text_field]) for r in list(read_records(config.data.eval or config.data.train))[: args.texts]]
    mine, single = bundle.with_client(client), Bundle.load(args.out / "merged", threads=1)
    latency = {"adapters": [], "merged": []}
    for text in texts:
        for key, runner in (("adapters", mine), ("merged", single)):
            started = time.perf_counter()
            runner.logits([text])
            latency[key].append(time.perf_counter() - started)
    results = {
        "clients": len(clients),
        "base_bytes": files["model.onnx"],
        "adapter_bytes_all": adapter_bytes,
        "adapter_bytes_per_client": round(adapter_bytes / (len(clients) + 1)),
        "merged_bundle_bytes_one": one_merged,
        "adapter_bundle_vs_n_merged": round((files["model.onnx"] + adapter_bytes) / (len(clients) * one_merged), 3),
        "first_switch_ms_p50": round(1000 * statistics.median(first), 3),
        "first_switch_ms_max": round(1000 * max(first), 3),
        "switch_ms_p50": round(1000 * statistics.median(switches), 3),
        "switch_ms_max": round(1000 * max(switches), 3),
        "latency_ms_p50_adapters": round(1000 * statistics.median(latency["adapters"]), 3),
        "latency_ms_p50_merged": round(1000 * statistics.median(latency["merged"]), 3),
    }
    results["latency_adapters_vs_merged"] = round(results["latency_ms_p50_adapters"] / results["latency_ms_p50_merged"], 3)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
