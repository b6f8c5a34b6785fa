"""The FlowerTune-style baseline of benchmarks/framework_overhead.py really reloads the base model.

``benchmarks/reload_app`` loads the base model for every message through fedtune's own loader;
if a refactor turned that into a cached lookup, the benchmark would compare fedtune with itself.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_the_reload_app_loads_the_base_model_for_every_message(tmp_path):
    small = ["federation.clients=3", "federation.min_clients=3", "federation.rounds=2", "client.local_steps=1",
             "data.eval_max_examples=50", "output.plots=false", "data.partition.kind=iid"]  # fmt: skip
    args = ["simulate", "simulations/configs/quickstart.yaml", "--app", str(REPO / "benchmarks" / "reload_app")]
    result = run_cli(*args, "--out", str(tmp_path / "run"), *[a for s in small for a in ("--set", s)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["client_base_model_loads"] >= 3 * 2  # one per train message at least (evaluations load too)
