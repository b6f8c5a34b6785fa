"""The wire codec: exact, fp16 and int8 round trips within their bounds, bytes, bad payloads."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedtune import wire
from flower_helpers import StaticGrid, enter_run, reply
from strategies.base import payload_bytes
from strategies.fedit import FedIT


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    """MiniLM-sized LoRA tensors (r=8, 6 layers, query/value) with a classifier head."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"bert.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, 384, generator=generator) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(384, 8, generator=generator) * 1e-3
    tensors["classifier.weight"] = torch.randn(2, 384, generator=generator)
    tensors["classifier.bias"] = torch.zeros(2)
    return tensors


def _roundtrip(tensors, codec):
    return wire.decode(**wire.encode(tensors, codec))


def test_none_is_exact_and_keeps_names_and_shapes():
    tensors = _adapter()
    back = _roundtrip(tensors, "none")
    assert list(back) == list(tensors)
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)


def test_fp16_relative_error_is_within_half_precision():
    tensors = _adapter()
    back = _roundtrip(tensors, "fp16")
    for name, value in tensors.items():
        assert torch.all((back[name] - value).abs() <= value.abs() * 2**-11 + 1e-7), name


def test_int8_error_is_at_most_half_a_step_of_each_block():
    tensors = _adapter()
    back = _roundtrip(tensors, "int8")
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    flat_back = torch.cat([back[n].reshape(-1) for n in tensors])
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % wire.BLOCK)).reshape(-1, wire.BLOCK)
    step = padded.abs().amax(dim=1) / 127.0
    bound = (step / 2).repeat_interleave(wire.BLOCK)[: flat.numel()]
    error = (flat_back - flat).abs()
    assert torch.all(error <= bound * (1 + 1e-5) + 1e-12)
    assert error.max() > 0  # it is lossy: the bound is not vacuous
    # small tensors (B ~ 1e-3) keep their own scale: relative error stays small
    name = "bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert (back[name] - tensors[name]).norm() / tensors[name].norm() < 0.01


def test_compressed_payload_bytes():
    tensors = _adapter()
    size = {codec: payload_bytes(RecordDict(wire.encode(tensors, codec))) for codec in wire.CODECS}
    values = sum(t.numel() for t in tensors.values())
    assert size["none"] >= 4 * values
    assert size["fp16"] <= 0.51 * size["none"]
    assert size["int8"] <= 0.27 * size["none"]


@pytest.mark.parametrize(
    "layout_change, message",
    [
        ({"shape": [1, 2, 3]}, "do not agree"),
        ({"codec": "fp16"}, "not a valid payload"),
        ({"names": ["a"] * 28}, "do not agree"),
    ],
)
def test_bad_layouts_are_refused(layout_change, message):
    payload = wire.encode(_adapter(), "none")
    layout = ConfigRecord({**dict(payload["layout"]), **layout_change})
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload["arrays"], layout)


def test_a_compressed_federation_round_decodes_and_counts_compressed_bytes():
    enter_run()
    global_adapter = _adapter(0)
    exact = FedIT(min_clients=2)
    compressed = FedIT(min_clients=2, compression="int8")
    results, uploads = {}, {}
    for strategy in (exact, compressed):
        messages = list(strategy.configure_train(1, ArrayRecord(global_adapter), ConfigRecord(), StaticGrid([1, 2])))
        assert {str(m.content["config"]["compression"]) for m in messages} == {strategy.compression}
        updates = [_adapter(1), _adapter(2)]
        replies = []
        for message, update in zip(messages, updates):
            answer = reply(message, {})
            answer.content = RecordDict(
                {**wire.encode(update, strategy.compression), **{k: answer.content[k] for k in ("metrics", "info")}}
            )
            replies.append(answer)
        arrays, _ = strategy.aggregate_train(1, replies)
        assert not strategy.ledger.rejected
        results[strategy.compression] = arrays.to_torch_state_dict()
        uploads[strategy.compression] = strategy.ledger.bytes_up
        assert strategy.ledger.bytes_up == sum(payload_bytes(r.content) for r in replies)
    assert uploads["int8"] <= 0.27 * uploads["none"]
    for name in global_adapter:
        exact_mean = results["none"][name]
        assert (results["int8"][name] - exact_mean).norm() <= 0.01 * exact_mean.norm() + 1e-6, name


def test_a_reply_without_a_layout_is_rejected_with_a_reason():
    enter_run()
    strategy = FedIT(min_clients=1)
    messages = list(strategy.configure_train(1, ArrayRecord(_adapter()), ConfigRecord(), StaticGrid([1])))
    answer = reply(messages[0], _adapter(1))
    del answer.content["layout"]
    answer.content["arrays"] = ArrayRecord(_adapter(1))  # one array per tensor: not our format
    arrays, _ = strategy.aggregate_train(1, [answer])
    assert arrays is None
    assert "missing 'arrays' and 'layout' (or ZO 'zo' and 'zo-config')" in strategy.ledger.rejected[0]
