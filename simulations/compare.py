"""``fedtune compare``: several strategies on identical seeds and partitions, side by side.

Writes ``DIR/<strategy>/`` run directories (plus ``DIR/central/`` with ``--central``),
``DIR/summary.json``, ``DIR/summary.md`` and ``DIR/accuracy.png``. ``client.ranks`` applies to
the strategies that take per-client ranks; the others (and the centralised baseline) train
every client at ``adapter.r``, which is how a heterogeneous federation is compared with a
homogeneous one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedtune.core.config import Config  # noqa: E402
from fedtune.core.errors import UserError  # noqa: E402
from fedtune.core.rundir import RunDir  # noqa: E402
from fedtune.strategies import STRATEGIES, check_config, personalised, strategy_class, with_defaults  # noqa: E402


def run_comparison(config: Config, strategies: list[str], out: Path, central: bool, echo=print) -> dict[str, Any]:
    from fedtune.simulations.central import run_central
    from fedtune.simulations.simulate import run_simulation

    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    results: dict[str, Any] = {}
    jobs = [(name, False) for name in strategies] + ([("central", True)] if central else [])
    variants = {name: _variant(config, name, is_central, out) for name, is_central in jobs}  # refused before any runs
    for name, is_central in jobs:
        variant = variants[name]
        if config.client.ranks and not variant.client.ranks:
            takers = ", ".join(n for n, cls in STRATEGIES.items() if cls.plan.per_client_ranks)
            echo(f"{name}: every client at rank {variant.adapter.r} (client.ranks is for {takers})")
        run = RunDir.create(out / name, variant)
        echo(f"== {name} ==")
        try:
            summary = run_central(variant, run, echo) if is_central else run_simulation(variant, run, echo)
            results[name] = describe(name, run, summary)
        except UserError as err:
            results[name] = {"status": "failed", "error": str(err).splitlines()[0]}
            echo(f"{name} failed: {results[name]['error']}")
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(markdown_table(results))
    plot_comparison(out, [name for name, _ in jobs if results[name].get("status") == "completed"])
    return results


def _variant(config: Config, name: str, is_central: bool, out: Path) -> Config:
    """CONFIG for one strategy of the comparison (or the centralised baseline)."""
    variant = config.model_copy(deep=True)
    if not is_central:
        variant.strategy.name = name
    if is_central or not strategy_class(variant).plan.per_client_ranks:
        variant.client.ranks = None
    check_config(variant)
    with_defaults(variant)
    variant.output.dir, variant.output.name = str(out.resolve()), name
    return variant


def describe(name: str, run: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    records = run.metrics()
    final = records[-1]
    row = {
        "status": "completed",
        "final_accuracy": final.get("eval_accuracy"),
        "best_accuracy": summary.get("best", {}).get("eval_accuracy"),
        "best_round": summary.get("best", {}).get("round"),
        "client_accuracy": final.get("client_accuracy"),
        "personalized_accuracy": final.get("client_accuracy") if personalised(name) else None,
        "bytes_up_per_client_round": summary.get("bytes_up_per_client_round"),
        "bytes_down_per_client_round": summary.get("bytes_down_per_client_round"),
        "bytes_up_per_round": [r.get("bytes_up") for r in records],
        "bytes_down_per_round": [r.get("bytes_down") for r in records],
        "aggregate_s_per_round": _mean([r["aggregate_s"] for r in records if "aggregate_s" in r]),
        "wall_s": summary["wall_s"],
    }
    return row


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def markdown_table(results: dict[str, Any]) -> str:
    head = (
        "| strategy | final acc | best acc (round) | personalised acc | up / client-round | "
        "down / client-round | aggregation / round | wall |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, row in results.items():
        if row.get("status") != "completed":
            lines.append(f"| {name} | failed: {row.get('error', '')} | | | | | | |")
            continue
        lines.append(
            "| {} | {} | {} ({}) | {} | {} | {} | {} | {:.0f} s |".format(
                name,
                _pct(row["final_accuracy"]),
                _pct(row["best_accuracy"]),
                row["best_round"] or "-",
                _pct(row["personalized_accuracy"]),
                _mb(row["bytes_up_per_client_round"]),
                _mb(row["bytes_down_per_client_round"]),
                f"{1000 * row['aggregate_s_per_round']:.0f} ms" if row.get("aggregate_s_per_round") is not None else "-",
                row["wall_s"],
            )
        )
    return head + "\n".join(lines) + "\n"


def plot_comparison(out: Path, names: list[str]) -> Path:
    """Server accuracy per round of every run in OUT: ``OUT/accuracy.png``."""
    fig = comparison_figure(out, names)
    target = out / "accuracy.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def comparison_figure(out: Path, names: list[str]) -> plt.Figure:
    fig, axis = plt.subplots(figsize=(8, 5))
    for name in names:
        records = RunDir(out / name).metrics()
        points = [(r["round"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
        if points:
            (line,) = axis.plot(*zip(*points), marker="o", label=name)
            if personalised(name):  # its clients evaluate their own personalised models
                personal = [(r["round"], r["client_accuracy"]) for r in records if "client_accuracy" in r]
                axis.plot(*zip(*personal), linestyle="--", color=line.get_color(), label=f"{name} (personalised)")
    axis.set(xlabel="round", ylabel="accuracy (server eval)", title=out.name)
    axis.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    return fig


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f} MB"
