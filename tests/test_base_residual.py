"""FLoRA and FedEx-LoRA: what they fold into the frozen base, and everyone who must apply it.

The strategies' sums are checked on their own (exact stacking, exact averages), then the
residual's way through a real MiniLM model: the coordinator's state, the messages, a client's
model, a checkpoint and ``load_run_model`` (what ``fedtune evaluate`` and ``export`` use).
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedtune.core import wire
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.plan import RESIDUAL, residual_name, role_of
from fedtune.core.ranks import LoraScale, rank_of, resize
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.checkpoint import RESIDUAL_FILE, load_run_model, save_checkpoint
from fedtune.strategies import build_strategy, check_config
from fedtune.strategies.fedex import fedex_combine
from fedtune.strategies.flora import flora_combine, stacked
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

LAYERS = {"q": (5, 6), "v": (4, 6)}
ALPHA = 16.0
SCALE = LoraScale(ALPHA)


def _factors(rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (d_out, d_in) in LAYERS.items():
        tensors[f"m.{layer}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
        tensors[f"m.{layer}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    tensors["m.classifier.weight"] = torch.randn(2, 5, generator=generator)
    return tensors


def _product(tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    scale = SCALE.at(rank_of(tensors))
    return scale * tensors[f"m.{layer}.lora_B.weight"].double() @ tensors[f"m.{layer}.lora_A.weight"].double()


def test_flora_stack_is_the_exact_weighted_sum_of_products_at_any_ranks():
    clients = [resize(_factors(r, seed=r), 8, SCALE) for r in (2, 4, 8)]
    share = [0.2, 0.3, 0.5]
    b, a = stacked(clients, share, "m.q.lora_A.weight", "m.q.lora_B.weight")
    assert b.shape == (5, 24) and a.shape == (24, 6)
    exact = sum(p * c["m.q.lora_B.weight"].double() @ c["m.q.lora_A.weight"].double() for c, p in zip(clients, share))
    torch.testing.assert_close(b @ a, exact, rtol=1e-12, atol=1e-12)


def test_flora_merges_the_products_into_the_residual_and_restarts_the_adapter():
    ranks, weights = (2, 4, 8), [10.0, 30.0, 60.0]
    clients = [_factors(r, seed=r) for r in ranks]
    lifted = [resize(c, 8, SCALE) for c in clients]
    previous = {residual_name("m.q.lora_A.weight"): torch.ones(5, 6)}
    fresh = {f"m.{layer}.lora_A.weight": torch.full((8, 6), 0.5) for layer in LAYERS}
    combined = flora_combine(lifted, weights, SCALE.at(8), previous, fresh)
    for layer in LAYERS:
        exact = sum(w / 100 * _product(c, layer) for c, w in zip(clients, weights))
        before = 1.0 if layer == "q" else 0.0
        residual = combined[residual_name(f"m.{layer}.lora_A.weight")].double()
        torch.testing.assert_close(residual - before, exact, rtol=1e-5, atol=1e-5)
        assert not combined[f"m.{layer}.lora_B.weight"].any()
        assert torch.equal(combined[f"m.{layer}.lora_A.weight"], fresh[f"m.{layer}.lora_A.weight"])


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_fedex_global_model_is_the_exact_average_of_the_client_products(ranks):
    weights = [10.0, 30.0, 60.0]
    clients = [_factors(r, seed=r + 10) for r in ranks]
    lifted = [resize(c, 8, SCALE) for c in clients]
    combined = fedex_combine(lifted, weights, SCALE.at(8), {})
    for layer in LAYERS:
        exact = sum(w / 100 * _product(c, layer) for c, w in zip(clients, weights))
        model = _product(combined, layer) + combined[residual_name(f"m.{layer}.lora_A.weight")].double()
        torch.testing.assert_close(model, exact, rtol=1e-5, atol=1e-5)
        mean_b = sum(w / 100 * c[f"m.{layer}.lora_B.weight"] for c, w in zip(lifted, weights))
        torch.testing.assert_close(combined[f"m.{layer}.lora_B.weight"], mean_b)  # FedAvg's factors


def _minilm(rank: int = 4) -> tuple[Config, object]:
    config = Config.model_validate(
        {"strategy": {"name": "fedex"}, "adapter": {"r": rank, "alpha": ALPHA, "target_modules": ["query", "value"]}}
    )
    return config, build_adapter_model(config, ["neg", "pos"])


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_the_residual_travels_to_clients_and_into_checkpoints(tmp_path, name):
    config, model = _minilm()
    config.strategy.name = name
    base = {n: w.detach().clone() for n, w in model.residual_layers().items()}
    strategy = build_strategy(config)
    enter_run()
    first = strategy.configure_train(1, ArrayRecord(model.state()), ConfigRecord(), StaticGrid([1, 2]))
    assert all(wire.RESIDUAL_ARRAYS not in m.content.array_records for m in first)  # nothing folded yet
    generator = torch.Generator().manual_seed(0)
    trained = [
        {n: v + 0.05 * torch.randn(v.shape, generator=generator) for n, v in tensors_of(m).items()} for m in first
    ]
    arrays, _, ledger = play_round(strategy, [reply(m, t, 10, f"client-{i}", rank=4) for i, (m, t) in enumerate(zip(first, trained))], 1)
    assert arrays is not None and not ledger.rejected
    state = arrays.to_torch_state_dict()
    residual = {n: v for n, v in state.items() if role_of(n) == RESIDUAL}
    assert set(residual) == set(base) and all(v.abs().max() > 0 for v in residual.values())

    # every client's model: base + residual + s·B·A is the round's global model
    second = strategy.configure_train(2, arrays, ConfigRecord(), StaticGrid([1, 2]))
    expected = {n: tuple(w.shape) for n, w in model.residual_layers().items()}
    received = wire.decode_residual(second[0].content, expected)
    torch.testing.assert_close(received, residual)
    model.set_base_residual(received)
    for n, weight in model.residual_layers().items():
        torch.testing.assert_close(weight, base[n] + residual[n])
    model.set_base_residual({})  # a message without a residual (another run): the base as loaded
    assert all(torch.equal(w, base[n]) for n, w in model.residual_layers().items())

    # the checkpoint holds it, and loading the run's model applies it
    run = RunDir.create(tmp_path / "run", config)
    save_checkpoint(run, 1, model, state, {"strategy": strategy.state_dict()})
    assert (run.checkpoint(1) / RESIDUAL_FILE).is_file()
    loaded, _ = load_run_model(run)
    assert loaded.has_base_residual
    for n, weight in loaded.residual_layers().items():
        torch.testing.assert_close(weight, base[n] + residual[n])
    with pytest.raises(UserError, match="--quantization int8: strategy .* folded a residual"):
        load_run_model(run, quantization="int8")


def test_adapters_of_several_ranks_share_one_base_and_its_residual():
    from fedtune.engine.adapters import with_rank

    config, rank_4 = _minilm()
    base = {n: w.detach().clone() for n, w in rank_4.residual_layers().items()}
    rank_2 = with_rank(rank_4, config, 2)
    residual = {n: torch.full_like(w, 0.5) for n, w in base.items()}
    rank_2.set_base_residual(residual)
    rank_4.activate()
    rank_4.set_base_residual(residual)  # set again through the other adapter: not added twice
    assert all(torch.equal(w, base[n] + 0.5) for n, w in rank_4.residual_layers().items())
    rank_4.set_base_residual({})
    assert all(torch.equal(w, base[n]) for n, w in rank_2.residual_layers().items())


def test_a_residual_without_its_layout_or_not_finite_is_refused():
    config, model = _minilm()
    expected = {n: tuple(w.shape) for n, w in model.residual_layers().items()}
    packed = wire.encode({n: torch.zeros(shape) for n, shape in expected.items()})
    from flwr.app import RecordDict

    with pytest.raises(wire.WireError, match="'residual' without 'residual-layout'"):
        wire.decode_residual(RecordDict({wire.RESIDUAL_ARRAYS: packed["arrays"]}), expected)
    name = next(iter(expected))
    with pytest.raises(ValueError, match="not finite"):
        model.set_base_residual({name: torch.full(expected[name], float("nan"))})


def test_a_residual_for_a_layer_the_model_does_not_adapt_is_refused():
    _, model = _minilm()
    with pytest.raises(ValueError, match="does not adapt"):
        model.set_base_residual({"base_model.model.bert.pooler.dense.base_residual": torch.zeros(384, 384)})


def test_a_quantized_base_cannot_take_a_residual():
    config = Config.model_validate({"strategy": {"name": "flora"}, "model": {"quantization": "int8"}})
    with pytest.raises(UserError, match="strategy.name flora: adds a residual to the frozen base weights"):
        check_config(config)
