"""The floor plan holds: one import namespace, and imports that only point down.

The import-linter contracts in pyproject.toml run over the package tree as pip installs
it (pyproject's package-dir mapping, copied), since the checkout keeps the floors in
top-level folders.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

from conftest import REPO
from fedtune.processes import tool_path


def installed_layout(root: Path) -> Path:
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):  # "fedtune" before "fedtune.engine"
        shutil.copytree(REPO / folder, root / package.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__"))
    return root


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool_path("lint-imports"), str(REPO / "pyproject.toml")],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_imports_point_down_the_floors(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout, result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    root = installed_layout(tmp_path)
    with open(root / "fedtune" / "engine" / "data.py", "a") as module:
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
