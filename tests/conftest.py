"""Shared fixtures. Tests run offline against the packaged models and ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data; tests that need it skip on machines without it."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not available on this machine")
    return path


SUPPORT_CHECK_ROWS = [
    {"text": "Thanks, the nurse sorted my appointment perfectly", "label": "praise"},
    {"text": "How do I reset the router?", "label": "question"},
    {"text": "My parcel is still missing, unacceptable", "label": "complaint"},
]


def write_support_check(path: Path) -> list[dict]:
    """Three hand-written rows of the quickstart's support task, as a .jsonl file."""
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in SUPPORT_CHECK_ROWS))
    return SUPPORT_CHECK_ROWS


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600):
    """Run the installed ``fedtune`` command as a user would."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """onnxruntime and Flower write under HOME; keep that out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    cache = Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))
    monkeypatch.setenv("FEDTUNE_CACHE", str(cache))  # keep the converted-model cache shared
    monkeypatch.setenv("HOME", str(home))
