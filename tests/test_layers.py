"""The floor plan holds, read from the checkout as any tool reads it: imports only point down.

``fedtune/<floor>`` is a link to the top-level ``<floor>/`` folder, so import-linter (and mypy,
pyright, editors) resolve every ``fedtune.*`` module to its file in the checkout; installed, the
package-dir mapping in pyproject.toml does the same, and site-packages holds ``fedtune`` alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from fedtune.core.processes import tool_path

FLOORS = ("core", "engine", "strategies", "coordinator", "client", "edge", "simulations")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` as a contributor runs it, in the checkout ROOT (its cwd is on the import path)."""
    return subprocess.run(
        [tool_path("lint-imports")], cwd=root, env={"PATH": str(Path(sys.executable).parent)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_imports_point_down_the_floors_in_the_checkout():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken" in result.stdout, result.stdout


def test_every_floor_is_reached_through_fedtune_in_the_checkout():
    for floor in FLOORS:
        link = REPO / "fedtune" / floor
        assert link.is_symlink() and link.resolve() == (REPO / floor).resolve(), floor


def test_an_upward_import_breaks_the_contract(tmp_path):
    root = tmp_path / "checkout"
    shutil.copytree(REPO, root, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "runs"))
    with open(root / "engine" / "data.py", "a") as module:
        module.write("\nfrom fedtune.coordinator import federation  # noqa\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "fedtune.engine.data -> fedtune.coordinator.federation" in result.stdout, result.stdout


def test_only_fedtune_is_installed():
    outside = subprocess.run(
        [sys.executable, "-c", "import fedtune.client, fedtune.engine\nimport client"],
        cwd="/", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "No module named 'client'" in outside.stderr, outside.stderr
