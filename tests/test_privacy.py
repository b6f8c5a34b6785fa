"""Differential privacy: DP-SGD on clients (Opacus) and client-level DP-FedAvg, with accounting.

ε is recomputed here from (sampling rate, noise multiplier, steps, δ) with a fresh Opacus
accountant, independently of how fedtune keeps its histories.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from conftest import run_cli, shared_data
from fedtune.cli.resolve import resolve
from fedtune.coordinator.identity import NodeNames
from fedtune.coordinator.session import Session
from fedtune.core.config import load_config
from fedtune.core.dp_accounting import clip_warning, torch_generator
from fedtune.core.errors import UserError
from fedtune.core.plan import role_of
from fedtune.core.records import read_records
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.checkpoint import load_checkpoint
from fedtune.engine.data import IGNORE_INDEX, TaskSpec, collate, encode
from fedtune.engine.dp_ledger import PrivacyLedger
from fedtune.engine.partition import client_rows
from fedtune.engine.rounds import PUBLIC_UNDER_CLIENT_DP
from fedtune.engine.trainers.backprop import BackpropTrainer, make_optimizer
from fedtune.engine.trainers.base import seeded_torch
from fedtune.engine.trainers.dpsgd import DPSGDTrainer, example_mean_loss, per_example_grad_norms
from fedtune.engine.trainers.moments import MOMENTS_FILE
from fedtune.strategies import build_strategy
from fedtune.strategies.client_dp import DpFedAvg
from fedtune.strategies.fair import fair_aggregate
from fedtune.strategies.fedit import weighted_mean
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

QUICKSTART = "simulations/configs/quickstart.yaml"
SMALL = ["federation.clients=3", "federation.min_clients=3", "data.partition.kind=iid", "data.eval_max_examples=60"]


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(delta)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _target_between(epsilons: list[float], rounds_allowed: int) -> float:
    """A budget that fits ``rounds_allowed`` rounds but not one more."""
    return (epsilons[rounds_allowed - 1] + epsilons[rounds_allowed]) / 2


def _budgeted_run(mode: str, sigma: float, target: float, out, *extra: str):
    """A 5-round simulation of SMALL at noise σ and a target ε that stops it early."""
    privacy = [f"privacy.mode={mode}", f"privacy.noise_multiplier={sigma}", f"privacy.target_epsilon={target}"]
    settings = [*SMALL, "federation.rounds=5", *privacy, *extra]
    return run_cli("simulate", QUICKSTART, *[f"--set={s}" for s in settings], "--out", str(out))


# -- sample level: DP-SGD on every client ---------------------------------------------


@pytest.fixture(scope="module")
def job():
    config = resolve(
        load_config(QUICKSTART, ["client.optimizer=sgd", "client.lr=1.0", "client.local_steps=1", "privacy.seed=3"]),
        name_hint="dp",
        need_train_data=True,
    )
    model = build_adapter_model(config, list(config.data.labels))
    spec = TaskSpec.from_config(config)
    train = encode(list(read_records(config.data.train))[:400], spec, model.tokenizer, "train")
    held = encode(list(read_records(config.data.eval)), spec, model.tokenizer, "eval")
    return config, model, train, held


def _update_norm(model, trainer, data, config) -> tuple[float, int]:
    """Norm of one training call's change to the adapter, and the examples it used."""
    params = model.trainable({"lora_A", "lora_B", "head"})
    model.load_state({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in model.state().items()})
    before = model.state()
    result = trainer.train(model, params, data, config.client, random.Random(0))
    after = model.state()
    return math.sqrt(sum(float((after[k] - before[k]).square().sum()) for k in before)), result.examples


def test_dp_sgd_leaves_the_shared_model_as_it_found_it(job, tmp_path):
    config, model, train, _ = job
    ledger = PrivacyLedger.load(tmp_path, 1e-5)
    _update_norm(model, DPSGDTrainer(ledger, 1.0, 1.0, 16 / len(train), random.Random(5)), train, config)
    assert ledger.accountant.history == [(1.0, 16 / len(train), 1)]
    assert not any(hasattr(p, "grad_sample") for p in model.params.values())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.model.modules())
    assert not model.model.training


LM_UNEVEN = [  # responses of different lengths: a token-mean loss would weigh examples unequally
    "simulations/configs/smollm2-quickstart.yaml",
    ["data.label_words={complaint: a complaint about the service, question: question, praise: praise}"],
]


@pytest.mark.parametrize("config_path,extra", [(QUICKSTART, []), LM_UNEVEN])
def test_dp_sgd_update_is_the_mean_of_clipped_per_example_gradients(config_path, extra, tmp_path):
    """Sample rate 1 (every example in the batch), no noise, SGD with lr 1: the update must be
    minus the mean of each example's own gradient clipped to C, computed here one example at a time."""
    overrides = ["client.optimizer=sgd", "client.lr=1.0", "client.local_steps=1", "adapter.dropout=0", *extra]
    config = resolve(load_config(config_path, overrides), name_hint="dp", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels or []))
    for module in model.model.modules():  # per-example gradients below must see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = encode(list(read_records(config.data.train))[:6], TaskSpec.from_config(config), model.tokenizer, "t")
    if model.task == "causal-lm":  # target lengths differ, so a token-mean batch loss would show
        assert len({sum(t != IGNORE_INDEX for t in e["labels"]) for e in data.examples}) > 1
    params = model.trainable({"lora_A", "lora_B", "head"})
    generator = torch.Generator().manual_seed(0)
    model.load_state({k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in model.state(["lora_B"]).items()})
    start = model.state()
    model.model.train()
    grads = []
    for example in data.examples:
        loss = example_mean_loss(model.model, collate([example], data.pad_id), model.task)
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    norms = [math.sqrt(sum(float(g.square().sum()) for g in grad.values())) for grad in grads]
    clip = sorted(norms)[len(norms) // 2]  # some examples are clipped, the others pass unscaled
    expected = {name: torch.zeros_like(value) for name, value in start.items()}
    for grad, norm in zip(grads, norms):
        for name, value in grad.items():
            expected[name] -= value * min(1.0, clip / (norm + 1e-6)) / len(data)
    trainer = DPSGDTrainer(PrivacyLedger.load(tmp_path, 1e-5), 0.0, clip, 1.0, random.Random(0))
    assert trainer.train(model, params, data, config.client, random.Random(0)).examples == len(data)
    for name, value in model.state().items():
        torch.testing.assert_close(value - start[name], expected[name], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_dp_sgd_clips_per_sample_gradients_over_a_quantized_base(quantization, tmp_path):
    """Opacus hooks only the LoRA and head layers (full precision); the frozen bitsandbytes base is left alone."""
    overrides = [f"model.quantization={quantization}", "client.optimizer=sgd", "client.lr=1.0", "client.local_steps=1"]
    config = resolve(load_config(QUICKSTART, overrides), name_hint="dp", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels))
    data = encode(list(read_records(config.data.train))[:200], TaskSpec.from_config(config), model.tokenizer, "t")
    trainer = DPSGDTrainer(PrivacyLedger.load(tmp_path, 1e-5), 0.0, 1e-3, 16 / len(data), random.Random(2))
    norm, drawn = _update_norm(model, trainer, data, config)
    assert drawn > 0 and 0 < norm <= 1e-3 * drawn / 16 * (1 + 1e-4)


def test_dp_sgd_without_noise_or_clipping_is_adamw_on_its_poisson_batches(job, tmp_path):
    """Noise 0 and a clip no gradient reaches: DP-SGD must take exactly AdamW's steps on the
    Poisson batches it draws, each batch's mean gradient times |batch| / expected size (Opacus
    divides the summed per-example gradients by the expected batch size), and so must
    non-private training with ``client.sampling: poisson`` on the same draws. Replayed by hand."""
    config, model, train, _ = job
    settings = config.client.model_copy(update={"optimizer": "adamw", "lr": 0.002, "local_steps": 12})
    rate, expected_size = 16 / len(train), 16
    generator = torch.Generator().manual_seed(0)
    start = model.state() | {
        k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in model.state(["lora_B"]).items()
    }  # B != 0, so A has gradients too

    def secret() -> random.Random:  # DP-SGD's secret: the noise generator's seed first, then the draws
        source = random.Random(1)
        torch_generator(source)
        return source

    def replay(train_with) -> dict[str, torch.Tensor]:
        model.load_state(start)
        with seeded_torch(7, model.device):  # the same dropout masks in every replay
            train_with(model.trainable({"lora_A", "lora_B", "head"}))
        return model.state()

    def by_hand(params) -> None:
        optimizer, draws = make_optimizer(params, settings), secret()
        model.model.train()
        for _ in range(settings.local_steps):
            chosen = [i for i in range(len(train)) if draws.random() < rate]
            sizes.append(len(chosen))
            batch = collate([train.examples[i] for i in chosen], train.pad_id)
            (model.model(**batch).loss * len(chosen) / expected_size).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.model.eval()

    sizes: list[int] = []
    expected = replay(by_hand)
    assert len(set(sizes)) > 1  # batch sizes vary, so the weighting is exercised
    unclipped = DPSGDTrainer(PrivacyLedger.load(tmp_path, 1e-5), 0.0, 1e6, rate, random.Random(1))
    poisson = settings.model_copy(update={"sampling": "poisson", "batch_size": expected_size})
    trained = {
        "dp-sgd": replay(lambda params: unclipped.train(model, params, train, settings, random.Random(0))),
        "poisson": replay(lambda params: BackpropTrainer().train(model, params, train, poisson, secret())),
    }
    update = math.sqrt(sum(float((expected[k] - start[k]).square().sum()) for k in start))
    assert update > 1e-2  # it trained
    for name, state in trained.items():
        mismatch = math.sqrt(sum(float((state[k] - expected[k]).square().sum()) for k in start))
        # float-summation order only (Opacus sums per-example gradients, AdamW amplifies the difference:
        # 1.26e-4 of the update seen under load); a wrong batch weighting is off by a fraction of it
        assert mismatch <= 1e-3 * update, (name, mismatch, update)


@pytest.mark.slow
def test_sample_level_run_accounts_each_client_like_opacus_and_stops_at_its_budget(tmp_path):
    config = resolve(load_config(QUICKSTART, SMALL), name_hint="dp", need_train_data=True)
    steps, sigma = config.client.local_steps, 1.0
    rates = {f"client-{k}": 16 / len(client_rows(config, k)[0]) for k in range(3)}
    per_round = [max(opacus_epsilon([(sigma, q, steps * r)]) for q in rates.values()) for r in (1, 2, 3)]
    target = _target_between(per_round, 2)
    result = _budgeted_run("sample", sigma, target, tmp_path / "run", "client.optimizer_state=kept")
    assert result.returncode == 0, result.stdout + result.stderr
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        for name, epsilon in record["client_epsilon"].items():
            expected = opacus_epsilon([(sigma, rates[name], steps * record["round"])])
            assert epsilon == pytest.approx(expected, rel=0.01)
        assert record["epsilon"] == max(record["client_epsilon"].values()) <= target
    assert "privacy budget spent" in result.stdout
    assert "fewer than federation.min_clients=3 can still train" in result.stdout
    # batch 16 against ~74k noised coordinates at σ = 1: the preflight says so once, before round 1
    assert result.stdout.count("very likely to learn nothing") == 1, result.stdout
    assert "(the median client" in result.stdout and "round   1/" not in result.stdout.split("learn nothing")[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "budget-reached" and summary["privacy"]["epsilon"] <= target
    for name in rates:  # the ledger a restarted agent would continue from
        history = json.loads((tmp_path / "run" / "clients" / name / "privacy.json").read_text())["history"]
        assert history == [[sigma, rates[name], 2 * steps]]
        kept = load_file(str(tmp_path / "run" / "clients" / name / MOMENTS_FILE))  # AdamW's, across both rounds
        assert {key for key in kept if key.endswith("/step")} and all(
            float(value) == 2 * steps for key, value in kept.items() if key.endswith("/step")
        )


# -- client level: DP-FedAvg in the strategy ----------------------------------------


def _client_level_round(
    strategy_name: str, clip_norm: float, noise: float, deltas: list[float], extra: list[str] = ()
) -> tuple:
    """One round of the real strategy on three clients whose updates (from the broadcast they
    decoded) have the given norms: (strategy, broadcast, client tensors, new global tensors, ledger)."""
    enter_run()
    torch.manual_seed(0)
    overrides = [
        *SMALL, f"strategy.name={strategy_name}", "privacy.mode=client", f"privacy.noise_multiplier={noise}",
        f"privacy.clip_norm={clip_norm}", "privacy.seed=0", *extra,
    ]  # fmt: skip
    config = resolve(load_config(QUICKSTART, overrides), name_hint="dp", need_train_data=True)
    strategy = build_strategy(config)
    start = {"classifier.weight": torch.randn(3, 8)}
    for i in range(3):
        start |= {f"layer{i}.lora_A.weight": torch.randn(4, 8), f"layer{i}.lora_B.weight": torch.randn(8, 4)}
    messages = list(strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid([1, 2, 3])))
    broadcast = tensors_of(messages[0])  # with a lossy codec this differs from `start`
    replies, tensors = [], []
    for k, (message, norm) in enumerate(zip(messages, deltas)):
        direction = {n: torch.randn_like(value) for n, value in broadcast.items()}
        length = math.sqrt(sum(float(d.square().sum()) for d in direction.values()))
        tensors.append({n: broadcast[n] + norm / length * direction[n] for n in broadcast})
        proof = {"frozen-checksum": strategy.strategy.frozen_checksum or ""}
        replies.append(reply(message, tensors[-1], num_examples=10 * (k + 1), name=f"client-{k}", **proof))
    new, _, ledger = play_round(strategy, replies, 1)
    return strategy, broadcast, tensors, new.to_torch_state_dict(), ledger


@pytest.mark.parametrize(
    "strategy_name,extra", [("fedit", []), ("ffa", []), ("fedsa", []), ("ffa", ["federation.compression=int8"])]
)
def test_client_updates_entering_the_aggregate_are_clipped_to_clip_norm(strategy_name, extra):
    """Norms are measured from the broadcast each client decoded (int8: not the server's exact copy)."""
    strategy, broadcast, _, new, ledger = _client_level_round(strategy_name, 0.5, 0.0, [5.0, 0.2, 2.0], extra)
    assert ledger.stats["update_norms"] == pytest.approx([5.0, 0.2, 2.0], rel=1e-4)
    assert ledger.stats["clip_norm"] == 0.5 and not ledger.rejected
    mean_update = math.sqrt(sum(float((new[n] - broadcast[n]).square().sum()) for n in broadcast))
    assert mean_update <= 0.5 * (1 + 1e-5)  # every contribution <= C, so their mean is too


def test_fair_clips_its_update_and_products_as_one_vector():
    """FAIR's correction reads B_k·A_k, so its changes are in the clipped release too."""
    deltas = [5.0, 0.2, 2.0]  # norms of the clients' tensor changes alone
    strategy, broadcast, tensors, new, ledger = _client_level_round("fair", 0.5, 0.0, deltas)
    pairs = [(f"layer{i}.lora_A.weight", f"layer{i}.lora_B.weight") for i in range(3)]
    for norm, delta, mine in zip(ledger.stats["update_norms"], deltas, tensors):
        changes = [mine[n] - broadcast[n] for n in broadcast] + [
            mine[b] @ mine[a] - broadcast[b] @ broadcast[a] for a, b in pairs
        ]
        assert norm == pytest.approx(math.sqrt(sum(float(c.square().sum()) for c in changes)), rel=1e-4)
        assert norm > delta * 1.01  # the products' changes count too
    released = [strategy.strategy.released(u) for u in ledger.updates]
    assert all(sum(1 for k in r if ".lora_BA." in k) == 3 for r in released)
    a_change = math.sqrt(sum(float((new[a] - broadcast[a]).square().sum()) for a, _ in pairs))
    assert a_change <= 0.5 * (1 + 1e-5)  # A is not corrected: its change is a part of the clipped mean


def test_fair_under_client_level_dp_without_noise_or_clipping_is_plain_fair():
    """With z = 0 and no clipping the released means are the plain means: the correction is FAIR's own."""
    strategy, _, tensors, new, ledger = _client_level_round("fair", clip_norm=1e6, noise=0.0, deltas=[5.0, 0.2, 2.0])
    expected = fair_aggregate(tensors, [1, 1, 1], strategy.strategy.solver)  # DP-FedAvg weighs clients equally
    plain = weighted_mean(tensors, [1, 1, 1])
    for name, value in expected.items():
        torch.testing.assert_close(new[name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(new[b], plain[b], atol=1e-4) for b in new if ".lora_B." in b)  # corrected


def test_client_level_dp_without_noise_or_clipping_is_the_plain_mean():
    strategy, _, tensors, new, ledger = _client_level_round("fedit", clip_norm=1e6, noise=0.0, deltas=[5.0, 0.2, 2.0])
    expected = weighted_mean(tensors, [1, 1, 1])  # DP-FedAvg weighs clients equally
    for name, value in expected.items():
        torch.testing.assert_close(new[name], value, rtol=1e-5, atol=1e-6)


def test_client_level_noise_has_the_mechanism_s_scale():
    """Noise std on each coordinate of the mean = z·C/(q·N)."""
    strategy, start, _, new, ledger = _client_level_round("ffa", clip_norm=1e-6, noise=2.0, deltas=[1.0, 1.0, 1.0])
    noise = torch.cat([(new[n] - start[n]).flatten() for n in strategy.strategy.uploaded_names()])
    assert noise.std().item() == pytest.approx(2.0 * 1e-6 / 3, rel=0.15)
    assert strategy.mechanism.history == [(2.0, 1.0, 1)]


def test_client_level_sampling_is_poisson_at_the_fraction_and_accounted_at_it():
    config = resolve(
        load_config(
            QUICKSTART,
            ["privacy.mode=client", "privacy.noise_multiplier=1", "federation.fraction=0.3", "federation.min_clients=1"],
        ),
        name_hint="dp",
        need_train_data=True,
    )
    dp = DpFedAvg.from_config(config)
    sizes = [len(dp.sample(list(range(100)), round_number=1)) for _ in range(200)]
    assert 27 <= sum(sizes) / len(sizes) <= 33 and len(set(sizes)) > 5  # Binomial(100, 0.3), not a fixed 30
    assert dp.sample_rate == 0.3 and dp.expected_clients == pytest.approx(0.3 * config.federation.clients)


def test_clients_out_of_budget_are_not_sampled_to_train():
    enter_run()
    config = resolve(load_config(QUICKSTART, SMALL), name_hint="dp", need_train_data=True)
    strategy = build_strategy(config)
    session = Session(strategy, NodeNames(bound={2: "client-1"}), budget_replies=True)
    session.retired = {"client-1"}
    arrays, grid = ArrayRecord({"classifier.weight": torch.zeros(3, 8)}), StaticGrid([1, 2, 3])
    trained = strategy.configure_train(1, arrays, ConfigRecord(), session.trainers(grid))
    evaluated = strategy.configure_evaluate(1, arrays, ConfigRecord(), session.evaluators(grid))
    assert sorted(m.metadata.dst_node_id for m in trained) == [1, 3]
    assert sorted(m.metadata.dst_node_id for m in evaluated) == [1, 2, 3]


def test_client_level_state_survives_a_resume_and_adaptive_noise_is_split():
    overrides = ["privacy.mode=client", "privacy.noise_multiplier=1", "privacy.adaptive_clipping=true"]
    config = resolve(
        load_config(QUICKSTART, [*overrides, "privacy.clipped_count_stddev=5"]), name_hint="dp", need_train_data=True
    )
    dp = DpFedAvg.from_config(config)
    assert dp.count_stddev == 5 and dp.update_noise == pytest.approx((1 - (2 * 5) ** -2) ** -0.5)
    dp.history, dp.clip_norm = [(1.0, 1.0, 1), (1.0, 1.0, 1)], 0.37
    resumed = DpFedAvg.from_config(config)
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))  # as the checkpoint stores it
    assert resumed.history == dp.history and resumed.clip_norm == 0.37
    assert resumed.epsilon() == pytest.approx(opacus_epsilon([(1.0, 1.0, 2)]), rel=1e-6)


@pytest.mark.slow
def test_client_level_run_accounts_like_opacus_and_stops_at_its_budget(tmp_path):
    sigma = 2.0
    per_round = [opacus_epsilon([(sigma, 1.0, r)]) for r in (1, 2, 3)]
    target = _target_between(per_round, 2)
    result = _budgeted_run("client", sigma, target, tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    records = _records(tmp_path / "run")
    private = [json.loads(line) for line in (tmp_path / "run" / "logs" / "private-metrics.jsonl").open()]
    assert [r["round"] for r in records] == [r["round"] for r in private] == [1, 2]
    for record, hidden, expected in zip(records, private, per_round):
        assert record["epsilon"] == pytest.approx(expected, rel=0.01)
        assert record["epsilon"] <= target and hidden["clients"] == 3
        assert set(record) <= PUBLIC_UNDER_CLIENT_DP and "train_loss" in hidden  # published: the DP release only
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "train_loss" not in summary["final"] and "client_accuracy" not in summary["final"]
    # issue 31, finding 9: how many clients took part, and which were new, stays in logs/ too
    assert "client_processes" not in summary and "client_base_model_loads" not in summary
    states = [json.loads(p.read_text()) for p in (tmp_path / "run" / "checkpoints").glob("round-*/fedtune.json")]
    assert states and all("client_loads" not in state for state in states)
    logs = tmp_path / "run" / "logs"
    assert json.loads((logs / "private-summary.json").read_text())["client_base_model_loads"] >= 1
    assert json.loads((logs / "private-client-loads.json").read_text())
    assert "before round 3: privacy budget reached" in result.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "budget-reached"
    assert result.stdout.count("3.0 expected clients per round") == 1, result.stdout  # the preflight, once


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["privacy.mode=client"], "privacy.mode client: set privacy.noise_multiplier, privacy.target_epsilon or both"),
        (["privacy.mode=sample", "privacy.target_epsilon=3", "client.zo_clients=[1]"], "DP-SGD needs backprop clients"),
        (["privacy.mode=sample", "privacy.target_epsilon=3", "client.grad_accum=2"], "client.grad_accum must be 1"),
        (["privacy.mode=laplace"], "privacy.mode: Input should be 'none', 'sample' or 'client'"),
        (
            ["privacy.mode=client", "privacy.noise_multiplier=1", "federation.fraction=0.2"],
            "1.00 of 5 clients are expected per round, fewer than federation.min_clients (3)",
        ),
    ],
)
def test_dp_settings_that_cannot_be_honoured_are_refused_at_config_load(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve(load_config(QUICKSTART, overrides), name_hint="dp", need_train_data=True)


def test_adaptive_clipping_moves_the_clip_norm_towards_the_target_quantile():
    """No noise on the count: all updates clipped -> C grows; none clipped -> C shrinks (Andrew et al.)."""
    config = resolve(
        load_config(
            QUICKSTART, [*SMALL, "privacy.mode=client", "privacy.noise_multiplier=0", "privacy.adaptive_clipping=true"]
        ),
        name_hint="dp",
        need_train_data=True,
    )
    dp = DpFedAvg.from_config(config)
    dp.adapt([5.0, 5.0, 5.0], round_number=1)
    assert dp.clip_norm == pytest.approx(math.exp(0.2 * 0.5))
    dp.clip_norm = 1.0
    dp.adapt([0.1, 0.1, 0.1], round_number=2)
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * 0.5))


@pytest.mark.slow
def test_centralized_reference_trains_with_dp_sgd_and_reports_epsilon(tmp_path):
    common = ["--set", "federation.rounds=2", "--set", "client.local_steps=1", "--set", "data.eval_max_examples=60"]
    result = run_cli(
        "train", QUICKSTART, *common, "--set", "privacy.mode=sample", "--set", "privacy.target_epsilon=2",
        "--set", "strategy.name=ffa", "--out", str(tmp_path / "central"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = _records(tmp_path / "central")
    assert 0 < records[0]["epsilon"] < records[1]["epsilon"] <= 2.0
    assert records[0]["noise_multiplier"] == records[1]["noise_multiplier"] > 0
    first, last = (load_checkpoint(RunDir(tmp_path / "central").checkpoint(k))[0] for k in (1, 2))
    assert all(torch.equal(first[n], last[n]) for n in first if role_of(n) == "lora_A")  # FFA's A stays frozen
    assert not all(torch.equal(first[n], last[n]) for n in first if role_of(n) == "lora_B")
    refused = run_cli(
        "train", QUICKSTART, "--set", "privacy.mode=client", "--set", "privacy.noise_multiplier=1",
        "--out", str(tmp_path / "refused"),
    )  # fmt: skip
    assert refused.returncode != 0 and "fedtune train has none" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_a_logical_batch_in_physical_chunks_takes_the_same_dp_sgd_steps(job, tmp_path):
    """client.max_physical_batch: the Poisson batch is computed in chunks, each example clipped,
    the noise added once per logical step: the same steps as the whole batch at once (real
    clipping and noise here; dropout off, since chunks would draw other dropout masks)."""
    config, model, train, _ = job
    settings = config.client.model_copy(update={"optimizer": "adamw", "lr": 0.002, "local_steps": 6})
    rate = 24 / len(train)
    start = model.state()
    dropouts = [m for m in model.model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]

    def trained(physical: int | None, ledger_dir) -> dict[str, torch.Tensor]:
        model.load_state(start)
        trainer = DPSGDTrainer(PrivacyLedger.load(ledger_dir, 1e-5), 0.7, 0.5, rate, random.Random(11))
        chunked = settings.model_copy(update={"max_physical_batch": physical})
        result = trainer.train(model, model.trainable({"lora_A", "lora_B", "head"}), train, chunked, random.Random(0))
        assert trainer.ledger.accountant.history == [(0.7, rate, 6)]  # accounted per logical step, chunks or not
        return model.state() | {"loss": torch.tensor(result.loss)}

    try:
        for module in dropouts:
            module.p = 0.0
        whole, chunked = trained(None, tmp_path / "whole"), trained(5, tmp_path / "chunked")
    finally:
        for module, p in zip(dropouts, saved):
            module.p = p
    update = math.sqrt(sum(float((whole[k] - start[k]).square().sum()) for k in start))
    mismatch = math.sqrt(sum(float((chunked[k] - whole[k]).square().sum()) for k in start))
    assert update > 1e-2 and mismatch <= 1e-4 * update, (mismatch, update)
    assert float(chunked["loss"]) == pytest.approx(float(whole["loss"]), rel=1e-5)


@pytest.mark.parametrize("sampling", ["shuffle", "poisson"])
def test_without_dp_a_batch_in_physical_chunks_takes_the_same_steps(job, sampling):
    """The same recipe without DP at a large batch: chunks of the batch sum to its gradient."""
    config, model, train, _ = job
    settings = config.client.model_copy(
        update={"optimizer": "adamw", "lr": 0.002, "local_steps": 4, "batch_size": 24, "sampling": sampling}
    )
    start = model.state()
    dropouts = [m for m in model.model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in dropouts]

    def trained(physical: int | None) -> dict[str, torch.Tensor]:
        model.load_state(start)
        chunked = settings.model_copy(update={"max_physical_batch": physical})
        result = BackpropTrainer().train(
            model, model.trainable({"lora_A", "lora_B", "head"}), train, chunked, random.Random(0)
        )
        return model.state() | {"loss": torch.tensor(result.loss), "examples": torch.tensor(result.examples)}

    try:
        for module in dropouts:
            module.p = 0.0
        whole, chunked = trained(None), trained(5)
    finally:
        for module, p in zip(dropouts, saved):
            module.p = p
        model.load_state(start)
    update = math.sqrt(sum(float((whole[k] - start[k]).square().sum()) for k in start))
    mismatch = math.sqrt(sum(float((chunked[k] - whole[k]).square().sum()) for k in start))
    assert update > 1e-2 and mismatch <= 1e-3 * update, (mismatch, update)
    assert float(chunked["loss"]) == pytest.approx(float(whole["loss"]), rel=1e-5)
    assert int(chunked["examples"]) == int(whole["examples"])


def test_without_dp_causal_lm_chunks_weigh_tokens_as_the_whole_batch_does():
    """A causal LM's loss is a mean over the batch's predicted tokens; chunks of responses of
    different lengths (grouped by length) are weighted by their token counts to match it."""
    overrides = ["client.optimizer=sgd", "client.lr=1.0", "client.local_steps=1", "client.batch_size=6"]
    config = resolve(load_config(LM_UNEVEN[0], [*overrides, *LM_UNEVEN[1]]), name_hint="lm", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels or []))
    for module in model.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = encode(list(read_records(config.data.train))[:6], TaskSpec.from_config(config), model.tokenizer, "t")
    assert len({sum(t != IGNORE_INDEX for t in e["labels"]) for e in data.examples}) > 1
    generator = torch.Generator().manual_seed(0)
    model.load_state({k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in model.state(["lora_B"]).items()})
    start = model.state()

    def trained(physical: int | None) -> dict[str, torch.Tensor]:
        model.load_state(start)
        settings = config.client.model_copy(update={"max_physical_batch": physical})
        BackpropTrainer().train(model, model.trainable({"lora_A", "lora_B"}), data, settings, random.Random(0))
        return model.state()

    whole, chunked = trained(None), trained(2)
    update = math.sqrt(sum(float((whole[k] - start[k]).square().sum()) for k in start))
    mismatch = math.sqrt(sum(float((chunked[k] - whole[k]).square().sum()) for k in start))
    assert update > 1e-4 and mismatch <= 1e-3 * update, (mismatch, update)


def test_physical_chunks_hold_the_logical_batch_once_grouped_by_length():
    """Chunks in order of length pad each example only to its neighbours' lengths; every
    drawn example is computed exactly once, so the clipped sum is the same."""
    from fedtune.engine.trainers.dpsgd import physical_chunks

    lengths = {i: (i * 37) % 61 + 1 for i in range(200)}
    chosen = random.Random(3).sample(range(200), 90)
    chunks = physical_chunks(chosen, 16, lengths.__getitem__)
    assert sorted(i for chunk in chunks for i in chunk) == sorted(chosen)
    assert [len(chunk) for chunk in chunks] == [16] * 5 + [10]
    padded = sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)
    unsorted = sum(len(c) * max(lengths[i] for i in c) for c in (chosen[s : s + 16] for s in range(0, 90, 16)))
    assert padded < 0.75 * unsorted
    assert physical_chunks(chosen, None, lengths.__getitem__) == [chosen]  # whole: untouched
    assert physical_chunks([], 16, lengths.__getitem__) == [[]]  # an empty draw is still a step


def test_noise_to_signal_is_the_noise_norm_over_the_clip_norm():
    """σ·C/B on each of d coordinates has norm σ·C·√d/B; the averaged clipped signal at most C."""
    from fedtune.core.dp_accounting import NOISE_TO_SIGNAL_LIMIT, noise_to_signal, utility_warning

    assert noise_to_signal(0.5, 10_000, 50) == pytest.approx(1.0)
    assert noise_to_signal(2.0, 40_000, 100) == pytest.approx(4.0)
    noise = torch.randn(40_000, generator=torch.Generator().manual_seed(0)) * 2.0 / 100  # σ=2, C=1, B=100
    assert float(noise.norm()) == pytest.approx(noise_to_signal(2.0, 40_000, 100), rel=0.02)
    assert utility_warning("sample", 0.5, 10_000, 50 / NOISE_TO_SIGNAL_LIMIT) is None
    warning = utility_warning("sample", 2.0, 40_000, 100)
    assert "4.0x" in warning and "client.batch_size" in warning and "lora_A frozen" in warning
    warning = utility_warning("client", 2.0, 40_000, 10)
    assert "40.0x" in warning and "clients per round" in warning and "federation.fraction" in warning


def test_the_dp_preflight_warns_where_dp_learned_nothing_and_not_for_the_recipe():
    """BENCHMARKS.md: sst2-minilm's settings under DP (batch 32, fedit) stayed at the majority
    class at every ε, and client-level DP with 10 clients too; the sst2-dp recipes learn."""
    from fedtune.coordinator.dp_preflight import privacy_warnings

    shared_data("sst2", "train.tsv")

    def warnings(path: str, overrides: list[str], simulated: bool = True) -> list[str]:
        config = resolve(load_config(path, overrides), name_hint="preflight", need_train_data=True)
        model = build_adapter_model(config, list(config.data.labels))
        return privacy_warnings(config, build_strategy(config), model, simulated)

    old = ["privacy.mode=sample", "privacy.target_epsilon=8", "federation.rounds=12"]
    warning, clip = warnings("simulations/configs/sst2-minilm.yaml", old)
    assert "very likely to learn nothing" in warning and "the median client" in warning
    assert "max_grad_norm 1 clips most examples" in clip  # the first DP table's clip, too
    assert warnings("simulations/configs/sst2-minilm.yaml", old, simulated=False) == []  # agents judge themselves
    client_level = ["privacy.mode=client", "privacy.target_epsilon=8", "federation.rounds=12"]
    (warning,) = warnings("simulations/configs/sst2-minilm.yaml", client_level, simulated=False)
    assert "10.0 expected clients per round" in warning
    assert warnings("simulations/configs/sst2-dp.yaml", []) == []
    (warning,) = warnings("simulations/configs/sst2-dp.yaml", ["privacy.max_grad_norm=10"])
    assert "max_grad_norm 10 is" in warning and "(the median client)" in warning
    (warning,) = warnings("simulations/configs/sst2-dp.yaml", ["privacy.max_grad_norm=0.5"])
    assert "clips most examples" in warning
    # client level, 1,000 clients (BENCHMARKS.md): 200 per round came within 5 points of no DP, 10 learned nothing
    assert warnings("simulations/configs/sst2-dp-client.yaml", []) == []
    (warning,) = warnings("simulations/configs/sst2-dp-client.yaml", ["federation.fraction=0.01"])
    assert "10.0 expected clients per round" in warning and "9,986 noised coordinates" in warning


def test_per_example_grad_norms_are_each_example_s_own_gradient_norm(job):
    """What the clip preflight reports is what DP-SGD clips: one example's loss gradient over the
    trained tensors, here against one backward pass per example (dropout off on both sides)."""
    config, model, train, _ = job
    params = model.trainable({"lora_B", "head"})
    dropouts = [m for m in model.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        settings = config.client.model_copy(update={"max_physical_batch": 4})  # chunks as a client computes them
        norms = per_example_grad_norms(model, params, train, settings, random.Random(1), count=6)
        chosen = random.Random(1).sample(range(len(train)), 6)
        order = sorted(chosen, key=train.length)  # physical_chunks' order
        model.model.train()
        expected = []
        for index in order:
            model.model.zero_grad(set_to_none=True)
            model.model(**train.collate([index])).loss.backward()
            expected.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in params.values())))
        model.model.zero_grad(set_to_none=True)
        model.model.eval()
    finally:
        for m, rate in zip(dropouts, rates):
            m.p = rate
    assert norms == pytest.approx(expected, rel=1e-4)
    assert not any(hasattr(p, "grad_sample") for p in model.params.values())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.model.modules())


def test_the_clip_warning_says_where_the_clip_should_be():
    """BENCHMARKS.md "DP recipes": norms with median 1.18 and 90th percentile 1.25; clip 1 stayed at
    the majority class, 1.5 learned, 3 and 10 lost ~15 points to noise."""
    norms = [1.10, 1.12, 1.15, 1.17, 1.18, 1.18, 1.20, 1.22, 1.24, 1.25, 1.30]
    assert clip_warning(1.5, norms, "x") is None
    assert clip_warning(2.4, norms, "x") is None
    below = clip_warning(1.0, norms, "client-3's")
    assert "max_grad_norm 1 clips most examples" in below and "majority class" in below
    assert "11 of client-3's examples" in below and "near 1.5" in below
    above = clip_warning(10.0, norms, "x")
    assert "max_grad_norm 10 is 8.0x" in above and "noise grows" in above and "near 1.5" in above
    assert clip_warning(10.0, [], "x") is None
