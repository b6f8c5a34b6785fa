"""Adapter tensors: seeded init, role plumbing, and the PEFT checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedtune.core.config import Config
from fedtune.core.plan import ParameterPlan, checksum, role_of
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import build_adapter_model, coordinates_by_role, initial_state
from fedtune.engine.base_model import load_base_model
from fedtune.engine.checkpoint import load_checkpoint, load_run_model, save_checkpoint

LABELS = ["complaint", "praise", "question"]


@pytest.fixture(scope="module")
def config() -> Config:
    return Config.model_validate(
        {
            "model": {"name": "minilm-l6", "max_length": 32},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "data": {"labels": LABELS},
        }
    )


@pytest.fixture(scope="module")
def adapter(config):
    return build_adapter_model(config, LABELS)


def test_roles_cover_lora_factors_and_head(adapter):
    roles = {role_of(name) for name in adapter.params}
    assert roles == {"lora_A", "lora_B", "head"}
    assert len(adapter.names(["lora_A"])) == len(adapter.names(["lora_B"])) == 12  # 6 layers x (query, value)
    assert all(name.endswith(("lora_A.weight", "lora_B.weight")) or ".classifier." in name for name in adapter.params)


def test_coordinates_by_role_are_counted_without_weights_as_the_built_model_holds_them(config, adapter):
    built = {role: 0 for role in ("lora_A", "lora_B", "head")}
    for name, tensor in adapter.state().items():
        built[role_of(name)] += tensor.numel()
    assert coordinates_by_role(config, LABELS) == built
    assert built == {"lora_A": 6 * 2 * 4 * 384, "lora_B": 6 * 2 * 384 * 4, "head": 384 * 3 + 3}


def test_initial_state_is_seeded_and_peft_shaped(adapter):
    first = initial_state(adapter.model, 7, adapter.params)
    again = initial_state(adapter.model, 7, adapter.params)
    other = initial_state(adapter.model, 8, adapter.params)
    assert checksum(first) == checksum(again) != checksum(other)
    for name, value in first.items():
        if role_of(name) == "lora_B":
            assert torch.count_nonzero(value) == 0  # the adapter starts as a no-op
        if role_of(name) == "lora_A":
            bound = 1 / value.shape[1] ** 0.5
            assert value.abs().max() <= bound and value.std() > bound / 3


def test_trainable_follows_the_plan(adapter):
    plan = ParameterPlan(
        trained=frozenset({"lora_B", "head"}), sent=frozenset({"lora_B", "head"}), frozen=frozenset({"lora_A"})
    )
    params = adapter.trainable(plan.trained)
    assert {id(p) for p in params.values()} == {id(adapter.params[n]) for n in adapter.names(["lora_B", "head"])}
    assert not any(adapter.params[n].requires_grad for n in adapter.names(["lora_A"]))
    base_trainable = [
        n
        for n, p in adapter.model.named_parameters()
        if p.requires_grad and ".lora_" not in n and "modules_to_save" not in n
    ]
    assert base_trainable == []


def test_plan_round_trips_through_a_config_record():
    plan = ParameterPlan(
        trained=frozenset({"lora_A", "lora_B"}), sent=frozenset({"lora_A"}), private=frozenset({"lora_B"})
    )
    assert ParameterPlan.from_record(plan.to_record()) == plan


def test_checkpoint_is_a_peft_adapter_that_peft_loads(tmp_path, config, adapter):
    generator = torch.Generator().manual_seed(0)
    trained = {name: torch.randn(value.shape, generator=generator) * 0.1 for name, value in adapter.state().items()}
    run = RunDir.create(tmp_path / "run", config.model_copy(update={"data": config.data}))
    path = save_checkpoint(run, 3, adapter, trained, {"strategy": {}})
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "fedtune.json"}

    tensors, state = load_checkpoint(path)
    assert state["round"] == 3 and state["labels"] == LABELS
    assert set(tensors) == set(trained) and all(torch.equal(tensors[k], trained[k]) for k in trained)

    inputs = adapter.tokenizer(
        ["the delivery was late again", "how do I reset the router?"], padding=True, return_tensors="pt"
    )
    adapter.load_state(trained)
    adapter.model.eval()
    with torch.no_grad():
        expected = adapter.model(**inputs).logits
        plain = PeftModel.from_pretrained(load_base_model("minilm-l6", "classification", 3, torch.device("cpu")), path)
        plain.eval()
        assert torch.allclose(plain(**inputs).logits, expected, atol=1e-5)
        reloaded, round_number = load_run_model(run)
        assert round_number == 3
        assert torch.allclose(reloaded.model(**inputs).logits, expected, atol=1e-5)


def test_load_state_rejects_a_wrong_shape(adapter):
    name = adapter.names(["lora_A"])[0]
    with pytest.raises(ValueError, match="shape"):
        adapter.load_state({name: torch.zeros(1, 1)})
