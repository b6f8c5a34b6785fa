"""PNG plots of run metrics (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedtune.core.rundir import RunDir  # noqa: E402


def plot_run(run: RunDir) -> Path:
    """Accuracy, loss and traffic against rounds: ``plots/metrics.png``."""
    fig = run_figure(run.metrics(), run.path.name)
    run.plots.mkdir(parents=True, exist_ok=True)
    target = run.plots / "metrics.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def run_figure(records: list[dict], title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, axis in (("accuracy", axes[0]), ("loss", axes[1])):
        for prefix, label in (("eval_", "server eval"), ("client_", "client held-out"), ("train_", "train")):
            points = [(r["round"], r[prefix + key]) for r in records if r.get(prefix + key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set(xlabel="round", ylabel=key, title=key)
        axis.grid(alpha=0.3)
        axis.legend()
    for key in ("bytes_up", "bytes_down"):
        points = [(r["round"], r[key] / 1e6) for r in records if key in r]
        if points:
            axes[2].plot(*zip(*points), marker="o", label=key)
    axes[2].set(xlabel="round", ylabel="MB (all clients)", title="traffic per round")
    axes[2].grid(alpha=0.3)
    if axes[2].lines:
        axes[2].legend()
        axes[2].set_ylim(bottom=0)  # a constant traffic is a flat line, not noise zoomed to fill the panel
    else:  # a centralized run (fedtune train) sends nothing
        axes[2].text(0.5, 0.5, "no federated traffic", ha="center", va="center", transform=axes[2].transAxes)
    for axis in axes:
        axis.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
