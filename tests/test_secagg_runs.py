"""Secure aggregation in Flower's Simulation Engine: the same model as without it, and a client lost mid-round.

The quickstart with FFA-LoRA, once in the clear and once under ``secagg+``: the coordinator then
sees only masked vectors, yet the checkpoints agree to the quantization step. With
``benchmarks/hostile_app``, one client drops out after the key exchange, every round: its pair
masks are removed with the others' shares and each round sums the four that uploaded.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

QUICKSTART = "simulations/configs/quickstart.yaml"
SMALL = [
    "strategy.name=ffa",
    "federation.rounds=2",
    "client.local_steps=3",
    "data.eval_max_examples=120",
    "output.plots=false",
]


def _simulate(out, *overrides: str, app: str | None = None):
    args = ["simulate", QUICKSTART, "--out", str(out), *(["--app", app] if app else [])]
    result = run_cli(*args, *[a for s in [*SMALL, *overrides] for a in ("--set", s)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(out / "checkpoints" / "round-2" / "adapter_model.safetensors")), result.stdout


def test_secure_aggregation_gives_the_plain_run_s_model(tmp_path):
    plain, plain_model, _ = _simulate(tmp_path / "plain")
    secure, secure_model, _ = _simulate(tmp_path / "secure", "federation.secure_aggregation=secagg+")
    assert plain_model.keys() == secure_model.keys()
    for name, value in plain_model.items():
        assert (secure_model[name] - value).abs().max() < 1e-5, name
    assert [r["clients"] for r in secure] == [5, 5] and all(r["secagg_s"] > 0 for r in secure)
    assert abs(secure[-1]["eval_loss"] - plain[-1]["eval_loss"]) < 1e-4
    assert all(1.0 < s["bytes_up"] / p["bytes_up"] < 1.1 for s, p in zip(secure, plain))  # masks: 4 B a value, as fp32


def test_a_client_lost_after_the_key_exchange_is_unmasked_by_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_ATTACKS", json.dumps({"4": "dropout"}))
    app = str(REPO / "benchmarks" / "hostile_app")
    records, model, stdout = _simulate(tmp_path / "dropout", "federation.secure_aggregation=secagg+", app=app)
    assert [r["clients"] for r in records] == [4, 4] and [r["secagg_dropped"] for r in records] == [1, 1]
    assert all(r["eval_accuracy"] > 0.3 for r in records)
    assert all(value.isfinite().all() for value in model.values())


def test_a_round_below_the_threshold_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_ATTACKS", json.dumps(dict.fromkeys(["2", "3", "4"], "dropout-first")))
    app = str(REPO / "benchmarks" / "hostile_app")
    out = tmp_path / "skipped"
    records, _, stdout = _simulate(out, "federation.secure_aggregation=secagg+", "federation.round_retries=0", app=app)
    assert [r["round"] for r in records] == [2] and records[0]["clients"] == 5
    assert "round 1: secure aggregation: stopped at train: 2 of 5 clients answered, threshold 3" in stdout
    assert "round 1: skipped (secure aggregation failed in every attempt); the global adapter is unchanged" in stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
