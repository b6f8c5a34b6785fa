"""What a finished round and a finished run leave behind: progress lines and summary.json."""

from __future__ import annotations

from typing import Any

from fedtune.config import Config
from fedtune.plots import plot_run
from fedtune.rundir import RunDir


def progress_line(record: dict[str, Any], rounds: int) -> str:
    parts = [f"round {record['round']:>3}/{rounds}"]
    if record.get("train_loss") is not None:
        parts.append(f"train_loss {record['train_loss']:.4f}")
    for key in ("eval_accuracy", "eval_loss", "client_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    if "sampled" in record:
        zo = f" ({record['zo_clients']} zo)" if record.get("zo_clients") else ""
        parts.append(f"clients {record['clients']}/{record['sampled']}{zo}")
        parts.append(f"up {record['bytes_up'] / 1e6:.2f} MB down {record['bytes_down'] / 1e6:.2f} MB")
    if "epsilon" in record:
        epsilon = "∞" if record["epsilon"] is None else f"{record['epsilon']:.3f}"
        parts.append(f"ε {epsilon} (δ {record['delta']:g})")
    parts.append(f"{record['wall_s']:.1f}s")
    if record.get("rejected"):
        parts.append(f"rejected {len(record['rejected'])}")
    return " | ".join(parts)


def finish_run(run: RunDir, config: Config, strategy: str, wall_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Write summary.json (and the plot) from metrics.jsonl; return the summary."""
    records = run.metrics()
    evaluated = [r for r in records if "eval_accuracy" in r]
    best = max(evaluated, key=lambda r: r["eval_accuracy"], default=None)
    summary: dict[str, Any] = {
        "status": "completed",
        "strategy": strategy,
        "model": config.model.name,
        "clients": config.federation.clients,
        "rounds": len(records),
        "final": {k: v for k, v in records[-1].items() if k.endswith(("accuracy", "loss"))} if records else {},
        "best": {"eval_accuracy": best["eval_accuracy"], "round": best["round"]} if best else {},
        "wall_s": round(wall_s, 3),
    }
    if records and "bytes_up" in records[0]:
        summary.update(
            {
                "bytes_up_total": sum(r["bytes_up"] for r in records),
                "bytes_down_total": sum(r["bytes_down"] for r in records),
                "bytes_up_per_client_round": _per_client(records, "bytes_up", "clients"),
                "bytes_down_per_client_round": _per_client(records, "bytes_down", "sampled"),
            }
        )
    if records and "epsilon" in records[-1]:
        privacy = config.privacy
        summary["privacy"] = {"mode": privacy.mode, "epsilon": records[-1]["epsilon"], "delta": privacy.delta}
        if privacy.seed is not None:  # repeatable noise: an experiment, not a guarantee
            summary["privacy"]["warning"] = "privacy.seed was set: anyone who knows it can remove the noise"
    summary.update(extra)
    run.write_summary(summary)
    if config.output.plots:
        plot_run(run)
    return summary


def say(text: str) -> None:
    """A line the launchers forward to the user's terminal."""
    print(f"[fedtune] {text}", flush=True)


def _per_client(records: list[dict[str, Any]], key: str, count: str) -> float:
    pairs = [(r[key], r[count]) for r in records if r.get(count)]
    return round(sum(b for b, _ in pairs) / max(1, sum(n for _, n in pairs)), 1)
