"""``client.optimizer_state: kept``: the optimizer's state carries over between a client's rounds.

Two rounds of two full-batch AdamW steps with the state kept must equal one round of four
steps, for plain backprop and for DP-SGD (σ = 0, a clip nothing reaches, Poisson rate 1);
restarted, they must not.
"""

from __future__ import annotations

import random

import pytest
import torch

from fedtune.cli.resolve import resolve
from fedtune.core.config import load_config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.data import TaskSpec, encode
from fedtune.engine.trainers import make_trainer
from fedtune.engine.trainers.moments import MOMENTS_FILE, keep, restore

QUICKSTART = "simulations/configs/quickstart.yaml"
EXAMPLES = 24


@pytest.fixture(scope="module")
def setup():
    config = resolve(load_config(QUICKSTART, []), name_hint="moments", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels))
    for module in model.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # full batches and no dropout: every run of the same steps is the same
    rows = list(read_records(config.data.train))[:EXAMPLES]
    return model, encode(rows, TaskSpec.from_config(config), model.tokenizer, "train"), model.state()


def _train(setup, tmp_path, privacy: str, kept: str, rounds: list[int]) -> dict[str, torch.Tensor]:
    model, data, start = setup
    overrides = [
        f"client.optimizer_state={kept}",
        f"client.batch_size={EXAMPLES}",
        "client.lr=0.01",
        f"privacy.mode={privacy}",
        "privacy.noise_multiplier=0.0",
        "privacy.max_grad_norm=1000000.0",
    ]
    config = resolve(load_config(QUICKSTART, overrides), name_hint="moments", need_train_data=True)
    model.load_state({k: v + 0.01 if ".lora_B." in k else v for k, v in start.items()})
    params = model.trainable({"lora_B", "head"})
    for number, steps in enumerate(rounds, start=1):
        trainer = make_trainer(config, "backprop", number, name="c", examples=len(data), steps=steps, state_dir=tmp_path)
        trainer.train(model, params, data, config.client, random.Random(number), steps)
    return model.state()


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).square().sum()) for k in a) ** 0.5


@pytest.mark.parametrize("privacy", ["none", "sample"])
def test_kept_state_makes_two_rounds_one(setup, tmp_path, privacy):
    start = setup[2]
    whole = _train(setup, tmp_path / "whole", privacy, "fresh", [4])
    kept = _train(setup, tmp_path / "kept", privacy, "kept", [2, 2])
    fresh = _train(setup, tmp_path / "fresh", privacy, "fresh", [2, 2])
    moved = _distance(whole, start)
    assert moved > 1e-3
    assert _distance(kept, whole) <= 1e-5 * moved
    assert _distance(fresh, whole) > 1e-2 * moved  # AdamW restarted: its first steps differ
    assert (tmp_path / "kept" / MOMENTS_FILE).is_file() and not (tmp_path / "fresh" / MOMENTS_FILE).exists()


def test_state_of_another_shape_starts_fresh(setup, tmp_path):
    """A state file written for other tensors (another rank) is not applied to these."""
    model = setup[0]
    params = model.trainable({"lora_B"})
    name, param = next(iter(params.items()))
    other = {name: torch.nn.Parameter(torch.zeros(param.shape[0], param.shape[1] + 1))}
    optimizer = torch.optim.AdamW(other.values())
    other[name].grad = torch.ones_like(other[name])
    optimizer.step()
    keep(optimizer, other, tmp_path / MOMENTS_FILE)
    fresh = torch.optim.AdamW(params.values())
    assert restore(fresh, params, tmp_path / MOMENTS_FILE) == 0 and not fresh.state
    assert restore(optimizer, other, tmp_path / MOMENTS_FILE) == 1


def test_an_unreadable_state_file_is_one_clear_error(setup, tmp_path):
    params = setup[0].trainable({"lora_B"})
    (tmp_path / MOMENTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="unreadable optimizer state.*delete it"):
        restore(torch.optim.AdamW(params.values()), params, tmp_path / MOMENTS_FILE)
