"""Clients of different LoRA ranks: the rank arithmetic, FlexLoRA and HetLoRA, and their replies."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.plan import ParameterPlan
from fedtune.core.ranks import LoraScale, rank_of, resize
from fedtune.core.wire import payload_bytes
from fedtune.strategies import STRATEGIES, build_strategy, check_config
from fedtune.strategies.flexlora import flexlora_combine, svd_factors
from fedtune.strategies.hetlora import hetlora_combine, product_norm, sparsity_weights
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

LAYERS = {"q": (5, 6), "v": (4, 6)}  # (d_out, d_in) of two targeted layers
ALPHA = 16.0
PER_CLIENT_RANK = [name for name, cls in STRATEGIES.items() if cls.plan.per_client_ranks]
SCALE = LoraScale(ALPHA)


def _factors(rank: int, seed: int, head: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, (d_out, d_in) in LAYERS.items():
        tensors[f"m.{layer}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
        tensors[f"m.{layer}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    if head:
        tensors["m.classifier.weight"] = torch.randn(2, 5, generator=generator)
    return tensors


def _products(tensors: dict[str, torch.Tensor], rslora: bool = False) -> dict[str, torch.Tensor]:
    rank = rank_of(tensors)
    return {
        layer: LoraScale(ALPHA, rslora).at(rank) * tensors[f"m.{layer}.lora_B.weight"] @ tensors[f"m.{layer}.lora_A.weight"]
        for layer in LAYERS
    }


# -- resize -----------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_padding_keeps_the_product_and_cutting_back_restores_the_factors(rslora):
    small = _factors(2, seed=0)
    padded = resize(small, 8, LoraScale(ALPHA, rslora))
    assert rank_of(padded) == 8 and padded["m.q.lora_A.weight"].shape == (8, 6)
    for layer, product in _products(small, rslora).items():
        torch.testing.assert_close(_products(padded, rslora)[layer], product, rtol=1e-5, atol=1e-5)
    back = resize(padded, 2, LoraScale(ALPHA, rslora))
    for name, value in small.items():
        torch.testing.assert_close(back[name], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded["m.classifier.weight"], small["m.classifier.weight"])  # heads untouched


def test_cutting_keeps_the_first_components_product():
    big = _factors(6, seed=1, head=False)
    cut = resize(big, 3, SCALE)
    for layer in LAYERS:
        b, a = big[f"m.{layer}.lora_B.weight"], big[f"m.{layer}.lora_A.weight"]
        expected = SCALE.at(6) * b[:, :3] @ a[:3]
        torch.testing.assert_close(_products(cut)[layer], expected, rtol=1e-5, atol=1e-5)


def test_factors_of_two_ranks_are_refused():
    mixed = {"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match="several ranks"):
        rank_of(mixed)


# -- FlexLoRA ---------------------------------------------------------------------------


def test_flexlora_at_full_svd_rank_reproduces_the_exact_weighted_product():
    """Equal client ranks (4), global rank ≥ rank of Σ w_k B_k A_k: the global product is exact."""
    clients = [_factors(4, seed=k) for k in range(3)]
    weights = [10.0, 30.0, 60.0]
    global_rank = 5  # min(d_out, d_in) of both layers: every product fits
    lifted = [resize(c, global_rank, SCALE) for c in clients]
    combined = flexlora_combine(lifted, weights, global_rank, resize(_factors(5, seed=7), global_rank, SCALE))
    total = sum(weights)
    for layer in LAYERS:
        exact = sum(w / total * _products(c)[layer] for c, w in zip(clients, weights))
        torch.testing.assert_close(_products(combined)[layer], exact, rtol=1e-4, atol=1e-4)
    head = sum(w / total * c["m.classifier.weight"] for c, w in zip(clients, weights))
    torch.testing.assert_close(combined["m.classifier.weight"], head)


def test_flexlora_cut_is_the_best_low_rank_approximation():
    delta = torch.randn(7, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b, a = svd_factors(delta, 3)
    singular = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(delta - (b @ a).double())
    assert float(error) == pytest.approx(float(singular[3:].square().sum().sqrt()), rel=1e-5)  # Eckart–Young
    b, a = svd_factors(delta[:2], 4)  # rank 4 asked of a rank-2 matrix: the rest is zero
    assert b.shape == (2, 4) and a.shape == (4, 9) and not b[:, 2:].any() and not a[2:].any()


# -- HetLoRA ----------------------------------------------------------------------------


def test_hetlora_pads_weights_by_norm_and_cuts_back_to_each_clients_shapes():
    ranks = [2, 4, 8]
    clients = [_factors(r, seed=r) for r in ranks]
    lifted = [resize(c, 8, SCALE) for c in clients]
    combined = hetlora_combine(lifted, [1.0, 1.0, 1.0])
    for layer in LAYERS:
        products = [t[f"m.{layer}.lora_B.weight"] @ t[f"m.{layer}.lora_A.weight"] for t in lifted]
        norms = [float(torch.linalg.matrix_norm(p)) for p in products]
        pairs = [(t[f"m.{layer}.lora_B.weight"], t[f"m.{layer}.lora_A.weight"]) for t in lifted]
        assert [product_norm(b, a) for b, a in pairs] == pytest.approx(norms, rel=1e-5)
        share = sparsity_weights(norms, [1.0] * 3)
        assert share == pytest.approx([n / sum(norms) for n in norms])
        expected = sum(p * t[f"m.{layer}.lora_A.weight"] for p, t in zip(share, lifted))
        torch.testing.assert_close(combined[f"m.{layer}.lora_A.weight"], expected)
    for rank, client in zip(ranks, clients):
        back = resize(combined, rank, SCALE)
        assert {n: tuple(v.shape) for n, v in back.items()} == {n: tuple(v.shape) for n, v in client.items()}


def test_hetlora_without_any_product_falls_back_to_example_weights():
    assert sparsity_weights([0.0, 0.0], [1.0, 3.0]) == pytest.approx([0.25, 0.75])


# -- the strategies on the wire ---------------------------------------------------------


def _strategy(name: str, global_rank: int = 8):
    config = Config.model_validate(
        {"strategy": {"name": name}, "adapter": {"r": global_rank, "alpha": ALPHA}, "federation": {"clients": 3}}
    )
    return build_strategy(config)


@pytest.mark.parametrize("name", PER_CLIENT_RANK)
def test_each_client_gets_and_sends_factors_of_its_own_rank(name):
    strategy = _strategy(name)
    start = _factors(8, seed=9)
    enter_run()
    first = strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid([1, 2, 3]))
    assert all(rank_of(tensors_of(m)) == 8 for m in first)  # ranks not known yet: the global rank
    assert ParameterPlan.from_record(dict(first[0].content["config"])).per_client_ranks
    ranks = {1: 2, 2: 4, 3: 8}
    replies = []
    for message in first:
        node = message.metadata.dst_node_id
        mine = resize(tensors_of(message), ranks[node], SCALE)  # what the client does (ClientJob.fit_rank)
        trained = {k: v + 0.01 * (node + 1) for k, v in mine.items()}
        replies.append(reply(message, trained, 10, f"client-{node}", rank=ranks[node]))
    arrays, _, ledger = play_round(strategy, replies, 1)
    assert arrays is not None and not ledger.rejected
    new = arrays.to_torch_state_dict()
    assert rank_of(new) == 8
    factor_bytes = [payload_bytes(RecordDict({k: m.content[k] for k in ("arrays", "layout")})) for m in first]
    second = strategy.configure_train(2, arrays, ConfigRecord(), StaticGrid([1, 2, 3]))
    assert {m.metadata.dst_node_id: rank_of(tensors_of(m)) for m in second} == ranks
    smaller = [payload_bytes(RecordDict({k: m.content[k] for k in ("arrays", "layout")})) for m in second]
    assert sum(smaller) < sum(factor_bytes)  # smaller ranks download smaller factors (FLoRA, FedEx: + a residual)


@pytest.mark.parametrize("name", PER_CLIENT_RANK)
def test_a_reply_is_checked_at_the_rank_it_declares(name):
    strategy = _strategy(name)
    enter_run()
    messages = strategy.configure_train(1, ArrayRecord(_factors(8, seed=2)), ConfigRecord(), StaticGrid([1, 2, 3, 4]))
    at_4 = resize(tensors_of(messages[0]), 4, SCALE)
    replies = [
        reply(messages[0], at_4, 10, "client-1", rank=4),  # fine
        reply(messages[1], at_4, 10, "client-2", rank=2),  # declares 2, sends 4
        reply(messages[2], _factors(9, seed=1), 10, "client-3", rank=9),  # above the global rank
        reply(messages[3], at_4, 10, "client-4"),  # no rank
    ]
    _, _, ledger = play_round(strategy, replies, 1)
    reasons = sorted(ledger.rejected)
    assert len(reasons) == 3 and reasons[0].startswith("client-2: ") and "shape" in reasons[0]
    assert all("'rank' must be an integer between 1 and 8" in r for r in reasons[1:]), reasons


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"strategy": {"name": "fedit"}, "client": {"ranks": [2, 4]}}, "client.ranks: strategy fedit trains every client at one rank"),
        ({"strategy": {"name": "flexlora"}, "client": {"ranks": [2, 16]}}, "client.ranks: 16 exceeds adapter.r (8)"),
        ({"strategy": {"name": "hetlora", "robust": "median"}}, "strategy.robust median: not with hetlora"),
        ({"strategy": {"name": "flexlora"}, "client": {"zo_upload": "seeds"}}, "client.zo_upload seeds"),  # agents may --mode zo
    ],
)
def test_what_per_client_ranks_cannot_do_is_one_line(settings, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_config(Config.model_validate(settings))


def test_a_client_whose_rank_the_strategy_cannot_take_is_told_so():
    from fedtune.client.job import ClientJob

    job = ClientJob.__new__(ClientJob)
    job.config, job.rank = Config.model_validate({"adapter": {"r": 8}}), 4
    with pytest.raises(UserError, match="rank 4: this run trains every client at rank 8"):
        job.fit_rank(STRATEGIES["fedit"].plan, _factors(8, seed=0))
    assert rank_of(job.fit_rank(STRATEGIES["flexlora"].plan, _factors(8, seed=0))) == 4



def test_compare_runs_homogeneous_strategies_at_the_global_rank(tmp_path):
    from fedtune.simulations.compare import _variant

    config = Config.model_validate({"adapter": {"r": 16}, "client": {"ranks": [2, 4, 8, 16]}})
    assert _variant(config, "flexlora", False, tmp_path).client.ranks == [2, 4, 8, 16]
    assert _variant(config, "fedit", False, tmp_path).client.ranks is None  # every client at rank 16
    assert _variant(config, "central", True, tmp_path).client.ranks is None
    assert config.client.ranks == [2, 4, 8, 16]  # the comparison's own config is left alone


@pytest.mark.slow
def test_agents_choose_their_rank_and_one_process_keeps_one_base_model(tmp_path):
    """Two agents (``fedtune client --rank 2`` and ``--rank 8``) served by one process, driven through
    the real ClientApp: each trains and replies at its rank, the base model is loaded once."""
    from flwr.app import Context, RecordDict
    from test_strategies import _config

    from conftest import write_support_check
    from fedtune.client import client_app
    from fedtune.client.job import SHARED_MODEL
    from fedtune.engine.adapters import build_adapter_model

    def contexts(config):
        data = tmp_path / "ours.jsonl"
        write_support_check(data)
        return {
            rank: Context(
                run_id=1,
                node_id=rank,
                state=RecordDict(),
                node_config={"data-path": str(data), "name": f"agent-{rank}", "state-dir": str(tmp_path), "rank": rank},
                run_config={"fedtune-config": config.to_yaml(), "run-dir": str(tmp_path)},
            )
            for rank in (2, 4)
        }

    config = _config("flexlora", tmp_path)  # adapter.r = 4
    strategy = build_strategy(config)
    arrays = ArrayRecord(build_adapter_model(config, config.data.labels).state())
    agents = contexts(config)
    enter_run()
    loads = None
    for round_number in (1, 2):
        messages = strategy.configure_train(round_number, arrays, ConfigRecord(), StaticGrid([2, 4]))
        replies = []
        for message in messages:
            replies.append(client_app.train(message, agents[message.metadata.dst_node_id]))
            loads = SHARED_MODEL.loads if loads is None else loads
        assert {r.content["info"]["name"]: r.content["info"]["rank"] for r in replies} == {"agent-2": 2, "agent-4": 4}
        arrays, _, ledger = play_round(strategy, replies, round_number)
        assert arrays is not None and not ledger.rejected, ledger.rejected
    assert SHARED_MODEL.loads == loads  # the second rank added an adapter, not a base model

    fedit = _config("fedit", tmp_path)
    message = build_strategy(fedit).configure_train(
        1, ArrayRecord(build_adapter_model(fedit, fedit.data.labels).state()), ConfigRecord(), StaticGrid([2])
    )[0]
    with pytest.raises(UserError, match="rank 2: this run trains every client at rank 4"):
        client_app.train(message, contexts(fedit)[2])


def test_flexlora_components_that_delta_w_leaves_empty_can_still_learn():
    """Two rank-1 clients, global rank 5: ΔW has rank 2, components 3 to 5 have no singular value.
    Their B stays zero (the product is exact) and their A rows keep the previous global A."""
    clients = [_factors(1, seed=k, head=False) for k in range(2)]
    previous = resize(_factors(5, seed=11, head=False), 5, SCALE)
    combined = flexlora_combine([resize(c, 5, SCALE) for c in clients], [1.0, 1.0], 5, previous)
    for layer in LAYERS:
        a, b = combined[f"m.{layer}.lora_A.weight"], combined[f"m.{layer}.lora_B.weight"]
        assert not b[:, 2:].any() and torch.equal(a[2:], previous[f"m.{layer}.lora_A.weight"][2:])
        exact = sum(0.5 * _products(c)[layer] for c in clients)
        torch.testing.assert_close(_products(combined)[layer], exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("declared", [2, 9])
def test_seed_uploads_are_refused_with_per_client_ranks(declared):
    """A ZO client's seeds would be replayed from the rank-R broadcast, not from where it started."""
    from flwr.app import ConfigRecord as Config_
    from flwr.app import Message, MetricRecord, RecordDict

    from fedtune.core import wire
    from fedtune.core.spsa import ZOStep

    strategy = _strategy("flexlora")
    enter_run()
    message = strategy.configure_train(1, ArrayRecord(_factors(8, seed=2)), ConfigRecord(), StaticGrid([1]))[0]
    seeds = wire.encode_seeds([ZOStep(0.01, [1, 2], [0.5, -0.5])], 0.0)
    content = RecordDict(
        {**seeds, "metrics": MetricRecord({"num-examples": 10}), "info": Config_({"name": "client-1", "rank": declared})}
    )
    _, _, ledger = play_round(strategy, [Message(content=content, reply_to=message)], 1)
    expected = "seed uploads: not with per-client ranks" if declared == 2 else "'rank' must be an integer between 1 and 8"
    assert len(ledger.rejected) == 1 and expected in ledger.rejected[0], ledger.rejected
    assert 1 not in strategy.ranks  # a refused reply teaches the coordinator nothing


def test_rank_auto_takes_the_largest_rank_whose_backprop_step_fits():
    from fedtune.engine.memory import MB, Footprint, choose_rank

    at_16 = Footprint(resident=500 * MB, backprop=900 * MB, zo=520 * MB)
    per_rank = 10 * MB
    assert choose_rank(at_16, 16, per_rank, 900 * MB)[0] == 16
    assert choose_rank(at_16, 16, per_rank, 899 * MB)[0] == 8  # 820 MB at rank 8
    assert choose_rank(at_16, 16, per_rank, 780 * MB)[0] == 4  # exactly 780 MB
    rank, reason = choose_rank(at_16, 16, per_rank, 770 * MB)
    assert rank == 2 and reason == "rank 2: backprop step ~760 MB fits the budget of 770 MB"
    rank, reason = choose_rank(at_16, 16, per_rank, 700 * MB)
    assert rank == 1 and "does not fit the budget of 700 MB even so" in reason
    assert choose_rank(at_16, 12, per_rank, 860 * MB)[0] == 8  # 12 itself, then 8, 4, 2, 1


def test_an_agent_with_rank_auto_measures_its_step_and_says_what_it_chose(tmp_path, capsys, monkeypatch):
    """The agent path of ClientJob: the rank comes from the estimate at adapter.r, the bytes one rank adds
    (counted from the model) and the budget. The estimate is pinned: a real one includes the process's
    resident memory, which moves by more than MiniLM's ~0.2 MB per rank between two calls."""
    import yaml

    from fedtune.client.job import ClientKey, job_of
    from fedtune.engine import memory

    raw = yaml.safe_load(open("simulations/configs/quickstart.yaml"))
    raw["strategy"]["name"] = "flexlora"
    raw["adapter"] = {"r": 8, "alpha": 16, "target_modules": ["query", "value"]}
    raw["data"].update({"labels": ["complaint", "question", "praise"], "train": None, "eval": None})
    raw["data"].pop("partition")
    text = yaml.safe_dump(raw)
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(f'{{"text": "message number {i} about the order", "label": "question"}}\n' for i in range(40)))
    at_8 = memory.Footprint(resident=400 * memory.MB, backprop=600 * memory.MB, zo=410 * memory.MB)
    monkeypatch.setattr(memory, "estimate", lambda *args: at_8)
    roomy = job_of(ClientKey(text, "roomy", str(tmp_path), data_path=str(rows), mode="backprop", memory_budget_mb=600.0, rank="auto"))
    assert roomy.rank == 8 and "roomy: auto rank: rank 8: backprop step ~600 MB fits" in capsys.readouterr().out
    per_rank = memory.rank_bytes(roomy.model, roomy.train, roomy.config.client)
    longest = max(len(e["input_ids"]) for e in roomy.train.examples)
    assert per_rank == 16 * 12 * (384 + 384) + 4 * 12 * 16 * longest  # 12 LoRA layers of MiniLM, batch 16
    budget_mb = (at_8.backprop - 5 * per_rank) / memory.MB  # room for rank 3, not 4: rank 2
    tight = job_of(ClientKey(text, "tight", str(tmp_path), data_path=str(rows), mode="backprop", memory_budget_mb=budget_mb, rank="auto"))
    assert tight.rank == 2 and tight.model.model is roomy.model.model  # one base model, an adapter per rank
    assert "tight: auto rank: rank 2" in capsys.readouterr().out
    zo = job_of(ClientKey(text, "zo", str(tmp_path), data_path=str(rows), mode="zo", memory_budget_mb=1.0, rank="auto"))
    assert zo.rank == 8 and "a zo step's memory hardly depends on the rank" in capsys.readouterr().out
    one_rank = text.replace("name: flexlora", "name: fedit")
    fedit = job_of(ClientKey(one_rank, "fedit", str(tmp_path), data_path=str(rows), mode="backprop", memory_budget_mb=budget_mb, rank="auto"))
    assert fedit.rank == 8 and "strategy fedit trains every client at one rank" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "lots", "-2"])
def test_a_bad_rank_flag_is_one_line(value):
    from conftest import run_cli

    result = run_cli("client", "--coordinator", "x:1", "--data", "simulations/configs/quickstart.yaml", "--insecure", "--rank", value)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"fedtune: error: --rank {value}: use a positive integer (at most the run's adapter.r) or auto"]
