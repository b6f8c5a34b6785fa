"""One table and one figure for runs of one federation made by several `fedtune compare` calls.

Heterogeneous-rank strategies and their homogeneous FedIT baselines come from separate
commands (FedIT at rank 2 and at rank 16 need different `adapter.r`), often in different
sessions. This reads their finished run directories, labelled on the command line, and
writes the merged table (markdown, to stdout) and a figure: server accuracy per round, and
final accuracy against the bytes a client sends and receives per round.

    python benchmarks/rank_report.py --out docs/het-agnews.png --title "AG News, ranks 2/4/8/16" \
        "flexlora 2/4/8/16=/tmp/s25/het-agnews/flexlora" "fedit 16=/tmp/s25/het-agnews-f16/fedit" ...
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from fedtune.core.rundir import RunDir  # noqa: E402


def row(label: str, run: RunDir) -> dict:
    """What the table shows of one finished run."""
    records, summary = run.metrics(), run.summary()
    accuracy = [(r["round"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    aggregation = [r["aggregate_s"] for r in records if "aggregate_s" in r]
    return {
        "label": label,
        "curve": accuracy,
        "final": accuracy[-1][1],
        "best": max(accuracy, key=lambda point: point[1]),
        "up": summary["bytes_up_per_client_round"],
        "down": summary["bytes_down_per_client_round"],
        "aggregate_ms": 1000 * statistics.median(aggregation) if aggregation else None,
        "wall_s": summary["wall_s"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| run | final accuracy | best (round) | up / client-round | down / client-round | aggregation / round (median) | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        aggregate = "-" if r["aggregate_ms"] is None else f"{r['aggregate_ms']:,.0f} ms"
        lines.append(
            f"| {r['label']} | {100 * r['final']:.2f}% | {100 * r['best'][1]:.2f}% ({r['best'][0]}) "
            f"| {r['up'] / 1e6:.3f} MB | {r['down'] / 1e6:.3f} MB | {aggregate} | {r['wall_s']:,.0f} s |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], title: str) -> plt.Figure:
    fig, (curves, cost) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        (line,) = curves.plot(*zip(*r["curve"]), marker="o", markersize=3, label=r["label"])
        traffic = (r["up"] + r["down"]) / 1e6
        cost.scatter(traffic, 100 * r["final"], color=line.get_color())
        cost.annotate(r["label"], (traffic, 100 * r["final"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    curves.set(xlabel="round", ylabel="server accuracy", title=title)
    curves.xaxis.get_major_locator().set_params(integer=True)
    cost.set(xscale="log", xlabel="MB up + down per client-round (log)", ylabel="final accuracy (%)", title="accuracy against traffic")
    cost.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    cost.xaxis.set_minor_formatter(ticker.NullFormatter())
    for axis in (curves, cost):
        axis.grid(alpha=0.3)
    curves.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR, in table order")
    parser.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    rows = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=RUN_DIR")
        rows.append(row(label, RunDir(Path(path))))
    print(table(rows))
    fig = figure(rows, args.title)
    fig.savefig(args.out, dpi=100)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
