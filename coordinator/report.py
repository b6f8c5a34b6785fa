"""The ServerApp's lines for the user: the launchers forward those with the marker to the terminal."""

from __future__ import annotations

from fedtune.coordinator.superlink import MARKER


def say(text: str) -> None:
    """A line the launchers forward to the user's terminal."""
    print(f"{MARKER} {text}", flush=True)
