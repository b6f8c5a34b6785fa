"""Zeroth-order clients: forward-only steps, exact seed replay, mixed federations, auto mode."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from fedtune.cli.resolve import resolve
from fedtune.client.job import simulated_mode
from fedtune.core import wire
from fedtune.core.config import load_config
from fedtune.core.plan import role_of
from fedtune.core.records import read_records
from fedtune.core.spsa import ZOStep, pack, replay, unpack
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.data import TaskSpec, encode
from fedtune.engine.memory import choose_mode, estimate
from fedtune.engine.trainers.zo import ZOTrainer, zo_learning_rate

QUICKSTART = "simulations/configs/quickstart.yaml"


@pytest.fixture(scope="module")
def job():
    config = resolve(load_config(QUICKSTART), name_hint="zo", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels))
    data = encode(list(read_records(config.data.train))[:200], TaskSpec.from_config(config), model.tokenizer, "train")
    return config, model, data


@pytest.mark.parametrize("trained,sent", [({"lora_B", "head"}, {"lora_B", "head"}), ({"lora_A", "lora_B"}, {"lora_A"})])
def test_replaying_the_seeds_rebuilds_what_the_client_trained(job, trained, sent):
    """FFA (B + head) and FedSA (A sent, B private: the replay lacks B but keeps the z stream aligned)."""
    config, model, data = job
    settings = config.client.model_copy(
        update={"local_steps": 20, "zo_lr": 0.02, "zo_samples": 2, "weight_decay": 0.1, "zo_schedule": "cosine"}
    )
    params = model.trainable(trained)
    start = {name: p.detach().clone() for name, p in params.items()}
    result = ZOTrainer(2, 3).train(model, params, data, settings, random.Random(7))

    steps, weight_decay = wire.decode_seeds(**_seed_records(result.zo_steps, settings.weight_decay))
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    shared = {name: value for name, value in start.items() if role_of(name) in sent}
    rebuilt = replay(shared, shapes, steps, weight_decay)
    assert rebuilt.keys() == shared.keys()
    for name, value in rebuilt.items():
        delta = params[name].detach() - start[name]
        assert delta.norm() > 0, name
        assert (value - params[name].detach()).norm() <= 1e-6 * delta.norm(), name
    assert [step.lr for step in steps] == pytest.approx(
        [zo_learning_rate(settings, k, 2, 3, 20) for k in range(20)], rel=1e-6
    )


def _seed_records(steps: list[ZOStep], weight_decay: float) -> dict:
    records = wire.encode_seeds(steps, weight_decay)
    return {"arrays": records["zo"], "config": records["zo-config"]}


def test_a_zo_step_runs_forward_only_in_eval_mode(job):
    config, model, data = job
    seen: list[tuple[bool, bool]] = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_inference_mode_enabled(), module.training))
    )
    try:
        params = model.trainable({"lora_B", "head"})
        ZOTrainer().train(model, params, data, config.client.model_copy(update={"local_steps": 3}), random.Random(0))
    finally:
        hook.remove()
    assert seen == [(True, False)] * 6  # 3 steps x (+eps, -eps) forwards, inference mode, dropout off
    assert all(p.grad is None for p in model.params.values())


def test_seed_payloads_reject_what_does_not_fit():
    steps = [ZOStep(0.01, [1, 2], [0.5, -0.5]), ZOStep(0.02, [3, 4], [0.1, 0.2])]
    assert unpack(pack(steps), 2, 2) == [
        ZOStep(pytest.approx(0.01), [1, 2], [0.5, -0.5]),
        ZOStep(pytest.approx(0.02), [3, 4], [pytest.approx(0.1), pytest.approx(0.2)]),
    ]
    with pytest.raises(ValueError, match="do not hold"):
        unpack(pack(steps), 3, 2)
    broken = pack([ZOStep(0.01, [1], [float("nan")])])
    with pytest.raises(ValueError, match="finite"):
        unpack(broken, 1, 1)
    records = wire.encode_seeds(steps, 0.0)
    del records["zo-config"]["samples"]
    with pytest.raises(wire.WireError, match="not a ZO seed payload"):
        wire.decode_seeds(records["zo"], records["zo-config"])


def test_auto_mode_picks_zo_only_when_backprop_does_not_fit(job):
    config, model, data = job
    footprint = estimate(model, data, config.client.model_copy(update={"batch_size": 16}))
    assert footprint.resident < footprint.zo < footprint.backprop
    assert choose_mode(footprint, footprint.backprop + 1)[0] == "backprop"
    mode, reason = choose_mode(footprint, (footprint.zo + footprint.backprop) // 2)
    assert mode == "zo" and "backprop does not fit" in reason
    bigger = estimate(model, data, config.client.model_copy(update={"batch_size": 64}))
    assert bigger.backprop - bigger.resident > 3 * (footprint.backprop - footprint.resident)  # activations scale


def test_a_fraction_of_zo_clients_is_a_seeded_choice():
    config = load_config(QUICKSTART)
    config.client.zo_clients = 0.4
    modes = [simulated_mode(config, i) for i in range(config.federation.clients)]
    assert modes.count("zo") == 2 and modes == [simulated_mode(config, i) for i in range(config.federation.clients)]
    config.client.zo_clients = [0, 3]
    assert [simulated_mode(config, i) for i in range(5)] == ["zo", "backprop", "backprop", "zo", "backprop"]


def test_bad_zo_settings_are_one_line_errors(tmp_path):
    result = run_cli("simulate", QUICKSTART, "--set", "client.zo_clients=[0,7]", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fedtune: error: client.zo_clients: [0, 7] names clients beyond 0..4"]
    result = run_cli("client", "--coordinator", "x:1", "--data", QUICKSTART, "--insecure", "--memory-budget", "lots")
    assert result.returncode == 2
    assert "--memory-budget lots: use a positive size such as 4G" in result.stderr


@pytest.mark.slow
def test_seed_uploads_give_the_same_federation_at_a_kilobyte_per_client(tmp_path):
    """A mixed FedSA federation (1 ZO client of 3, its B private): uploading seeds instead of
    tensors changes nothing but the bytes: <= 2 KB per client-round for 20 local steps."""
    common = ["--set", "federation.clients=3", "--set", "data.partition.kind=iid", "--set", "data.eval_max_examples=60"]
    runs = {}
    for upload in ["delta", "seeds"]:
        result = run_cli(
            "simulate", QUICKSTART, *common, "--set", "strategy.name=fedsa", "--set", "client.zo_clients=[1]",
            "--set", f"client.zo_upload={upload}", "--set", "client.zo_lr=0.01", "--set", "federation.rounds=2",
            "--set", "client.local_steps=20", "--set", "client.zo_head=random", "--out", str(tmp_path / upload), timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        runs[upload] = (
            [json.loads(line) for line in (tmp_path / upload / "metrics.jsonl").read_text().splitlines()],
            load_file(tmp_path / upload / "checkpoints" / "round-2" / "adapter_model.safetensors"),
        )
    (delta, delta_adapter), (seeds, seeds_adapter) = runs["delta"], runs["seeds"]
    assert [r["zo_clients"] for r in delta] == [r["zo_clients"] for r in seeds] == [1, 1]
    for key, value in delta_adapter.items():
        torch.testing.assert_close(seeds_adapter[key], value, rtol=1e-5, atol=1e-7)
    assert [r["eval_accuracy"] for r in seeds] == [r["eval_accuracy"] for r in delta]
    for with_tensors, with_seeds in zip(delta, seeds, strict=True):
        # in delta mode all three replies are the same size; in seeds mode one of them is the ZO client's
        zo_client_bytes = with_seeds["bytes_up"] - with_tensors["bytes_up"] * 2 / 3
        assert 0 < zo_client_bytes <= 2048


def test_zo_trains_over_an_nf4_base_and_replays_exactly():
    config = resolve(load_config(QUICKSTART, ["model.quantization=nf4"]), name_hint="zo", need_train_data=True)
    model = build_adapter_model(config, list(config.data.labels))
    data = encode(list(read_records(config.data.train))[:64], TaskSpec.from_config(config), model.tokenizer, "train")
    params = model.trainable({"lora_B", "head"})
    start = {name: p.detach().clone() for name, p in params.items()}
    settings = config.client.model_copy(update={"local_steps": 5, "zo_lr": 0.01})
    result = ZOTrainer().train(model, params, data, settings, random.Random(3))
    assert np.isfinite(result.loss)
    rebuilt = replay(start, {n: tuple(v.shape) for n, v in start.items()}, result.zo_steps, 0.0)
    for name, param in params.items():
        assert not torch.equal(param.detach(), start[name])
        torch.testing.assert_close(rebuilt[name], param.detach(), rtol=0, atol=0)


def test_a_linear_probe_fits_the_head_that_zo_cannot_move(job):
    """Round 1 of a ZO client: the head fitted to frozen features of its data, forward passes only."""
    from fedtune.engine.evaluate import evaluate
    from fedtune.engine.trainers.probe import fit_linear_probe

    config, model, data = job
    held_out = encode(list(read_records(config.data.eval))[:150], TaskSpec.from_config(config), model.tokenizer, "eval")
    random_head = evaluate(model, held_out)["accuracy"]
    saved = model.state()
    head = fit_linear_probe(model, data)
    assert set(head) == set(model.names(["head"])) and all(p.grad is None for p in model.params.values())
    model.load_state(head)
    probed = evaluate(model, held_out)["accuracy"]
    model.load_state(saved)
    assert probed >= 0.7 and probed > random_head + 0.25, (random_head, probed)


def test_a_head_probe_reply_sends_the_head_alone_and_is_checked_like_any_other():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedtune.core.config import Config
    from fedtune.core.plan import checksum
    from fedtune.strategies import build_strategy
    from flower_helpers import StaticGrid, enter_run, play_round, tensors_of

    generator = torch.Generator().manual_seed(0)
    start = {"m.q.lora_A.weight": torch.randn(4, 6, generator=generator), "m.q.lora_B.weight": torch.zeros(5, 4)}
    start |= {"m.classifier.weight": torch.zeros(2, 5), "m.classifier.bias": torch.zeros(2)}
    fitted = {"m.classifier.weight": torch.randn(2, 5, generator=generator), "m.classifier.bias": torch.ones(2)}

    def probe(message, tensors, name, **info):
        content = RecordDict(
            {
                **wire.encode_head_probe(tensors),
                "metrics": MetricRecord({"num-examples": 10}),
                "info": ConfigRecord({"name": name, **info}),
            }
        )
        return Message(content=content, reply_to=message)

    enter_run()
    config = Config.model_validate({"strategy": {"name": "ffa", "robust": "none"}, "adapter": {"r": 4}, "federation": {"min_clients": 1}})
    strategy = build_strategy(config)
    messages = strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid([1, 2]))
    sent = tensors_of(messages[0])
    frozen = checksum({"m.q.lora_A.weight": start["m.q.lora_A.weight"]})
    replies = [
        probe(messages[0], fitted, "client-1", **{"frozen-checksum": frozen}),
        probe(messages[1], {**fitted, "m.q.lora_B.weight": torch.ones(5, 4)}, "client-2", **{"frozen-checksum": frozen}),
    ]
    arrays, _, ledger = play_round(strategy, replies, 1)
    assert len(ledger.rejected) == 1 and ledger.rejected[0].startswith("client-2: 'packed' is not")
    new = arrays.to_torch_state_dict()
    centred = {name: value - value.mean(0) for name, value in fitted.items()}  # what a probe sends
    torch.testing.assert_close(new["m.classifier.weight"], centred["m.classifier.weight"], atol=0.02, rtol=0)
    torch.testing.assert_close(new["m.classifier.bias"], centred["m.classifier.bias"], atol=0.02, rtol=0)
    features = torch.randn(100, 5, generator=generator)
    logits = [features @ head["m.classifier.weight"].T + head["m.classifier.bias"] for head in (fitted, new)]
    margins = [value - value[:, :1] for value in logits]  # what a softmax sees: logits up to one shift per row
    torch.testing.assert_close(margins[1], margins[0], atol=0.15, rtol=0)
    assert torch.equal(new["m.q.lora_B.weight"], sent["m.q.lora_B.weight"])  # the rest is the broadcast

    per_rank = build_strategy(Config.model_validate({"strategy": {"name": "flexlora"}, "adapter": {"r": 4}}))
    messages = per_rank.configure_train(1, ArrayRecord(start), ConfigRecord(), StaticGrid([1, 2]))
    _, _, ledger = play_round(per_rank, [probe(m, fitted, f"client-{i}", rank=4) for i, m in enumerate(messages)])
    assert len(ledger.rejected) == 2
    assert all("'probe': not with per-client ranks" in r for r in ledger.rejected)


def test_a_head_probe_for_sst2s_minilm_head_uploads_under_2_kb():
    """Issue 19's budget for a ZO client-round, with every field a real probe reply carries."""
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    head = {"base_model.model.classifier.weight": torch.randn(2, 384), "base_model.model.classifier.bias": torch.randn(2)}
    info = {"name": "client-0", "process": "p" * 64, "model-loads": 1, "frozen-checksum": "0" * 64, "mode": "zo", "rank": 8}
    metrics = {"num-examples": 6000, "train_s": 12.5, "steps": 0}
    content = {**wire.encode_head_probe(head), "metrics": MetricRecord(metrics), "info": ConfigRecord(info)}
    assert wire.payload_bytes(RecordDict(content)) <= 2048
    back = wire.decode_head_probe(content[wire.HEAD_PROBE], {name: tuple(v.shape) for name, v in head.items()})
    centred = {name: value - value.mean(0) for name, value in head.items()}
    bound = max(value.abs().max().item() for value in centred.values()) / 254  # int8: half a step of the largest scale
    for name, value in centred.items():
        torch.testing.assert_close(back[name], value, atol=bound * 1.0001, rtol=0)
