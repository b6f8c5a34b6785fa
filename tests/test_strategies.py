"""FFA-LoRA, FedSA-LoRA and LoRA-FAIR: their math, and what really crosses the wire."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedtune.client import client_app
from fedtune.core.config import Config
from fedtune.core.plan import role_of
from fedtune.core.rundir import RunDir
from fedtune.core.wire import payload_bytes
from fedtune.engine.adapters import build_adapter_model
from fedtune.strategies import build_strategy
from fedtune.strategies.fair import SolverSettings, fair_aggregate, fair_correction
from fedtune.strategies.fedit import weighted_mean
from flower_helpers import StaticGrid, enter_run, play_round, reply, tensors_of

K, L, R, D_IN, D_OUT = 10, 3, 8, 96, 64


def _factors(seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = [torch.randn(L, R, D_IN, generator=generator) * 0.1 for _ in range(K)]
    b = [torch.randn(L, D_OUT, R, generator=generator) * 0.01 for _ in range(K)]
    w = torch.rand(K, generator=generator) + 0.1
    return a, b, w / w.sum()


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ffa_aggregation_is_exact(seed):
    _, b, w = _factors(seed)
    a_shared = torch.randn(L, R, D_IN, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    b = [x.double() for x in b]
    mean_b = weighted_mean([{"b": x} for x in b], w.tolist())["b"]
    mean_product = sum(p * (x @ a_shared) for p, x in zip(w.double(), b))
    assert float((mean_b @ a_shared - mean_product).norm() / mean_product.norm()) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fair_correction_moves_strictly_closer_to_the_ideal_update(seed):
    a, b, w = _factors(seed)
    a_bar, b_corrected, delta = fair_correction(a, b, w)
    ideal = sum(p * (y.double() @ x.double()) for p, x, y in zip(w.double(), a, b))
    b_bar = sum(p * y for p, y in zip(w, b))
    for m in range(L):
        fedit, fair = b_bar[m].double() @ a_bar[m].double(), b_corrected[m].double() @ a_bar[m].double()
        assert _cos(fair, ideal[m]) > _cos(fedit, ideal[m]) + 1e-3
        assert (ideal[m] - fair).norm() < (ideal[m] - fedit).norm()
        assert delta[m].norm() > 0


def test_fair_reaches_the_best_cosine_any_b_can_give():
    a, b, w = _factors(5)
    a_bar, b_corrected, _ = fair_correction(a, b, w, SolverSettings(lam=0.0))
    ideal = sum(p * (y.double() @ x.double()) for p, x, y in zip(w.double(), a, b))
    s = a_bar.double() @ a_bar.double().transpose(-1, -2)
    best_b = ideal @ a_bar.double().transpose(-1, -2) @ torch.linalg.inv(s)  # least squares = max cosine
    for m in range(L):
        best = _cos(best_b[m] @ a_bar[m].double(), ideal[m])
        assert _cos(b_corrected[m].double() @ a_bar[m].double(), ideal[m]) == pytest.approx(best, abs=1e-4)


def test_fair_aggregate_batches_modules_and_keeps_fedit_means_elsewhere():
    a, b, w = _factors(3)
    updates = []
    for k in range(K):
        tensors = {"head.weight": torch.full((2, 4), float(k))}
        for m in range(L):
            tensors[f"layer{m}.q.lora_A.weight"] = a[k][m]
            tensors[f"layer{m}.q.lora_B.weight"] = b[k][m]
        updates.append(tensors)
    result = fair_aggregate(updates, w.tolist())
    plain = weighted_mean(updates, w.tolist())
    _, b_corrected, _ = fair_correction(a, b, w)
    assert torch.allclose(result["head.weight"], plain["head.weight"])
    for m in range(L):
        assert torch.allclose(result[f"layer{m}.q.lora_A.weight"], plain[f"layer{m}.q.lora_A.weight"])
        assert torch.allclose(result[f"layer{m}.q.lora_B.weight"], b_corrected[m], atol=1e-6)


# -- real client handlers, driven by each strategy's messages --------------------------


def _config(strategy: str, tmp_path) -> Config:
    from fedtune.cli.resolve import resolve

    raw = {
        "model": {"name": "minilm-l6", "max_length": 32},
        "adapter": {"r": 4, "alpha": 8},
        "strategy": {"name": strategy},
        "federation": {"clients": 5, "min_clients": 2},
        "client": {"local_steps": 2, "batch_size": 8},
        "data": {
            "train": "synthetic:support/train",
            "holdout": 0.02,
            "partition": {"kind": "field", "field": "domain"},
        },
        "output": {"dir": str(tmp_path), "name": f"{strategy}-run"},
    }
    return resolve(Config.model_validate(raw), name_hint="t", need_train_data=True)


def _federated_round(strategy_name: str, tmp_path, rounds: int = 2, clients=(0, 1)):
    """Drive the real ClientApp handler through ``rounds`` rounds of one strategy."""
    enter_run()
    config = _config(strategy_name, tmp_path)
    run = RunDir.create(tmp_path / "run", config)
    strategy = build_strategy(config)
    server = build_adapter_model(config, config.data.labels)
    arrays = ArrayRecord(server.state())
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            state=RecordDict(),
            node_config={"partition-id": node, "num-partitions": 5},
            run_config={"fedtune-config": config.to_yaml(), "run-dir": str(run.path)},
        )
        for node in clients
    }
    history = []
    for rnd in range(1, rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), StaticGrid(list(clients))))
        replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, _, ledger = play_round(strategy, replies, rnd)
        history.append((messages, replies, dict(ledger.__dict__)))
        assert arrays is not None and not ledger.rejected, ledger.rejected
    return config, run, strategy, history


@pytest.mark.slow
def test_fedsa_never_sends_or_receives_b_and_keeps_it_private(tmp_path):
    config, run, strategy, history = _federated_round("fedsa", tmp_path)
    for messages, replies, _ in history:
        for message in [*messages, *replies]:
            names = list(tensors_of(message))
            assert names and not [n for n in names if role_of(n) == "lora_B"]
            assert {role_of(n) for n in names} == {"lora_A", "head"}
    from safetensors.torch import load_file

    private = [load_file(str(run.client_dir(f"client-{i}") / "private.safetensors")) for i in (0, 1)]
    assert set(private[0]) == set(private[1]) and all(role_of(n) == "lora_B" for n in private[0])
    name = next(iter(private[0]))
    assert not torch.equal(private[0][name], private[1][name])  # personalised B per client
    assert torch.count_nonzero(private[0][name]) > 0


@pytest.mark.slow
def test_ffa_keeps_a_identical_across_clients_and_rounds_and_halves_uploads(tmp_path):
    _, _, strategy, history = _federated_round("ffa", tmp_path)
    checksums = {r.content["info"]["frozen-checksum"] for _, replies, _ in history for r in replies}
    assert checksums == {strategy.frozen_checksum}
    for messages, replies, _ in history:
        for message in [*messages, *replies]:
            assert {role_of(n) for n in tensors_of(message)} == {"lora_B", "head"}
    # a client whose A differs is refused
    messages, replies, _ = history[-1]
    # under its own name: only the frozen tensors are forged
    forged = reply(
        messages[0], tensors_of(replies[0]), name=replies[0].content["info"]["name"], **{"frozen-checksum": "0" * 64}
    )
    strategy.configure_train(3, ArrayRecord(strategy.current), ConfigRecord(), StaticGrid([0]))
    _, _, ledger = play_round(strategy, [forged], 3)
    assert any("frozen tensors differ" in reason for reason in ledger.rejected)


@pytest.mark.slow
def test_upload_bytes_per_strategy(tmp_path):
    uploads = {}
    for name in ("fedit", "ffa", "fedsa", "fair"):
        _, _, _, history = _federated_round(name, tmp_path / name, rounds=1)
        _, replies, ledger = history[0]
        uploads[name] = ledger["bytes_up"] / len(replies)
        assert ledger["bytes_up"] == sum(payload_bytes(r.content) for r in replies)
    assert uploads["ffa"] <= 0.55 * uploads["fedit"]
    assert uploads["fedsa"] <= 0.55 * uploads["fedit"]
    assert uploads["fair"] == pytest.approx(uploads["fedit"], rel=0.01)
