"""What every round and every run leave behind, the same for a federation and for ``fedtune train``:
when a round evaluates, its timings, its metrics line (only the DP release, under client-level
DP), its checkpoint, its progress line; at the end, summary.json and the plot."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.core.config import Config
from fedtune.core.plots import plot_run
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.checkpoint import save_checkpoint

# Under client-level DP only these leave the operator's logs: the noised model's evaluation on the
# server's own data and the mechanism's public settings. Clients' losses, accuracies, counts and
# bytes (which reveal who took part) are un-noised and go to logs/private-metrics.jsonl.
PUBLIC_UNDER_CLIENT_DP = frozenset(
    {"round", "eval_accuracy", "eval_loss", "epsilon", "delta", "noise_multiplier", "clip_norm", "wall_s", "elapsed_s"}
)


@dataclass
class RoundBook:
    """A run's per-round bookkeeping; ELAPSED_BEFORE is the time a resumed run had already spent."""

    config: Config
    run: RunDir
    echo: Callable[[str], None]
    elapsed_before: float = 0.0
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = time.time() - self.elapsed_before

    def elapsed(self) -> float:
        return time.time() - self.started

    def evaluates(self, rnd: int) -> bool:
        """Every ``federation.eval_every`` rounds, and always the last one."""
        every = self.config.federation.eval_every
        return rnd == self.config.federation.rounds or (every > 0 and rnd % every == 0)

    def close_round(
        self,
        record: dict[str, Any],
        round_start: float,
        model: AdapterModel,
        tensors: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        """Time the round, then write its metrics line and checkpoint, then say its progress line."""
        record["wall_s"] = round(time.time() - round_start, 3)
        record["elapsed_s"] = round(self.elapsed(), 3)
        self.run.append_metrics(*publishable(record, self.config.privacy.mode))
        save_checkpoint(self.run, record["round"], model, tensors, {**state, "elapsed_s": record["elapsed_s"]})
        self.echo(progress_line(record, self.config.federation.rounds))


def publishable(record: dict[str, Any], privacy_mode: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what metrics.jsonl may hold, what only the operator's private log may)."""
    if privacy_mode != "client":
        return record, {}
    public = {k: v for k, v in record.items() if k in PUBLIC_UNDER_CLIENT_DP}
    return public, {k: v for k, v in record.items() if k not in PUBLIC_UNDER_CLIENT_DP}


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


def _per_client(records: list[dict[str, Any]], key: str, count: str) -> float:
    pairs = [(r[key], r[count]) for r in records if r.get(count)]
    return round(sum(b for b, _ in pairs) / max(1, sum(n for _, n in pairs)), 1)
