"""fedtune's Flower App: the one app a coordinator submits and an agent agrees to serve.

The App directory (``core/flower_app/``) holds only a pyproject.toml naming the
ServerApp and ClientApp of the installed fedtune, so its FAB (Flower's app archive)
carries no code. Flower builds a FAB deterministically (sorted files, fixed zip dates),
so every machine with the same fedtune computes the same sha256: agents and the
coordinator's superexec run a task only when its FAB has exactly this hash, and then
run fedtune's installed code, never anything from the FAB.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "flower_app"


@functools.lru_cache(maxsize=1)
def app_fab_hash() -> str:
    """sha256 of the FAB that ``flwr run`` builds from ``APP_DIR``."""
    from fedtune.core.flower_internals import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()
