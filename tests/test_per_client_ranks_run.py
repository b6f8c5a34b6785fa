"""End to end: a simulated federation whose clients train at LoRA ranks 2, 4 and 8 (FlexLoRA)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli
from fedtune.core.ranks import rank_of

pytestmark = pytest.mark.slow


def test_clients_of_three_ranks_train_one_model_and_download_what_their_rank_needs(tmp_path):
    run = tmp_path / "run"
    settings = {
        "strategy.name": "flexlora",
        "client.ranks": "[2, 4, 8]",
        "federation.clients": "5",  # cycling the ranks: 2, 4, 8, 2, 4
        "federation.min_clients": "5",
        "federation.rounds": "2",
        "client.local_steps": "3",
        "data.eval_max_examples": "60",
        "simulation.client_cpus": "2",  # one Ray actor: one process serves every rank
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    result = run_cli("simulate", "simulations/configs/quickstart.yaml", "--out", str(run), *overrides, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [5, 5] and not any(r.get("rejected") for r in rounds)
    # round 1 sends rank 8 to everyone (ranks not known yet); round 2 each client its own rank
    assert rounds[1]["bytes_down"] < rounds[0]["bytes_down"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["client_processes"] == 1 and summary["client_base_model_loads"] == 1  # three ranks, one base
    final = load_file(str(sorted((run / "checkpoints").glob("round-*"))[-1] / "adapter_model.safetensors"))
    assert rank_of(final) == 8


def test_fedex_run_folds_its_residual_into_checkpoints_that_evaluate_applies(tmp_path):
    """FedEx-LoRA with ranks 2 and 4 (five clients): the server's round-2 evaluation is reproduced from the checkpoint
    only when its base residual is applied (what ``fedtune evaluate`` and ``export`` load)."""
    from fedtune.core.rundir import RunDir
    from fedtune.engine.checkpoint import RESIDUAL_FILE, load_run_model
    from fedtune.engine.evaluate import eval_set, evaluate

    run = tmp_path / "run"
    settings = {
        "strategy.name": "fedex",
        "client.ranks": "[2, 4]",
        "adapter.r": "4",
        "federation.min_clients": "5",
        "federation.rounds": "2",
        "client.local_steps": "3",
        "client.lr": "0.01",
        "data.eval_max_examples": "60",
        "simulation.client_cpus": "2",
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    result = run_cli("simulate", "simulations/configs/quickstart.yaml", "--out", str(run), *overrides, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds] == [5, 5] and not any(r.get("rejected") for r in rounds)
    assert rounds[1]["bytes_down"] > 5 * 4 * 384 * 384 * 12  # the dense residual (12 layers, fp32), to each client
    final = RunDir.open(run)
    assert (final.checkpoint(2) / RESIDUAL_FILE).is_file()
    model, _ = load_run_model(final)
    data = eval_set(final.config(), model)
    assert evaluate(model, data)["loss"] == pytest.approx(rounds[1]["eval_loss"], abs=1e-5)
    model.set_base_residual({})
    assert evaluate(model, data)["loss"] != pytest.approx(rounds[1]["eval_loss"], abs=1e-5)
