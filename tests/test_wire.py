"""The wire codec: exact, fp16 and int8 round trips within their bounds, bytes, bad and oversized payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedtune.core import wire
from fedtune.core.spsa import ZOStep
from fedtune.core.wire import payload_bytes
from fedtune.strategies.fedit import FedIT
from flower_helpers import StaticGrid, enter_run, play_round, reply


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
            answer = reply(message, {}, name=f"client-{message.metadata.dst_node_id}")  # one name per node
            answer.content = RecordDict(
                {**wire.encode(update, strategy.compression), **{k: answer.content[k] for k in ("metrics", "info")}}
            )
            replies.append(answer)
        arrays, _, ledger = play_round(strategy, replies, 1)
        assert not ledger.rejected
        results[strategy.compression] = arrays.to_torch_state_dict()
        uploads[strategy.compression] = ledger.bytes_up
        assert ledger.bytes_up == sum(payload_bytes(r.content) for r in replies)
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
    arrays, _, ledger = play_round(strategy, [answer], 1)
    assert arrays is None
    assert "one update: 'arrays' + 'layout'" in ledger.rejected[0]


# -- untrusted payloads: checked against the layout and the receiver's plan before a byte is read --


def _small() -> dict[str, torch.Tensor]:
    return {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.ones(4, 2), "head.bias": torch.ones(3)}


def _expected(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in tensors.items()}


@pytest.fixture
def numpy_calls(monkeypatch) -> list[Array]:
    """Every ``Array.numpy`` call: a payload refused by its metadata is never read."""
    calls, read = [], Array.numpy

    def spy(self):
        calls.append(self)
        return read(self)

    monkeypatch.setattr(Array, "numpy", spy)
    return calls


@pytest.mark.parametrize(
    "ndims, shape",
    [
        ([2, 2, 1], [-2, -3, 4, 2, 3]),  # the signs cancel: 6 + 8 + 3 values, as the payload has
        ([1, 2, 1], [-2, 8, 2, 11]),  # a negative size that sums to the payload
        ([2, -1, 4], [2, 3, 4, 2, 3]),
    ],
)
def test_negative_dimensions_are_refused_even_when_the_sizes_add_up(ndims, shape):
    payload = wire.encode(_small())
    layout = ConfigRecord({**dict(payload["layout"]), "ndims": ndims, "shape": shape})
    with pytest.raises(wire.WireError, match="ndims must be 0 to 8, dimensions non-negative"):
        wire.decode(payload["arrays"], layout)


@pytest.mark.parametrize(
    "layout_change, message",
    [
        ({"codec": "zip"}, "codec must be one of none, fp16, int8"),
        ({"names": "x.lora_A.weight"}, "names must be strings"),
        ({"shape": [2.0, 3.0, 4.0, 2.0, 3.0]}, "ndims and shape integers"),
        ({"ndims": [True, True, True]}, "ndims and shape integers"),
        ({"names": ["x" * 300, "b", "c"]}, "names of 1 to 256 characters"),
        ({"names": [f"t{i}" for i in range(wire.MAX_TENSORS + 1)]}, f"at most {wire.MAX_TENSORS} names"),
    ],
)
def test_malformed_layout_fields_are_refused(layout_change, message):
    payload = wire.encode(_small())
    layout = ConfigRecord({**dict(payload["layout"]), **layout_change})
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload["arrays"], layout)


def test_a_payload_fifty_times_the_plan_is_refused_before_it_is_read(numpy_calls):
    tensors = _small()
    honest_layout = wire.encode(tensors)["layout"]
    big = wire.encode({name: torch.ones(50 * value.numel()) for name, value in tensors.items()})
    with pytest.raises(wire.WireError, match="wrong shape, expected"):  # the layout admits the size
        wire.decode(big["arrays"], big["layout"], _expected(tensors))
    with pytest.raises(wire.WireError, match="not a valid payload"):  # the layout hides it
        wire.decode(big["arrays"], honest_layout, _expected(tensors))
    assert numpy_calls == []
    assert set(wire.decode(**wire.encode(tensors), expected=_expected(tensors))) == set(tensors)
    assert len(numpy_calls) == 1


def test_an_array_whose_metadata_lies_about_its_size_is_refused_before_it_is_read(numpy_calls):
    payload = wire.encode(_small())
    honest = payload["arrays"]["values"]
    extra = bytes(50 * 17 * 4 + wire.NPY_HEADER)  # more bytes than 17 values and any .npy header
    padded = Array(dtype="float32", shape=honest.shape, stype=honest.stype, data=honest.data + extra)
    with pytest.raises(wire.WireError, match="not a valid payload"):
        wire.decode(ArrayRecord({"values": padded}), payload["layout"], _expected(_small()))
    assert numpy_calls == []
    # metadata and byte size agree, the bytes do not: refused after reading a bounded buffer
    doubles = Array(np.ones(17 // 2, dtype=np.float64))
    forged = Array(dtype="float32", shape=(17,), stype=doubles.stype, data=doubles.data + bytes(4))
    with pytest.raises(wire.WireError, match="not a valid payload|not a numpy array"):
        wire.decode(ArrayRecord({"values": forged}), payload["layout"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["arrays"].__setitem__("extra", Array(np.zeros(1, dtype=np.float32))), "arrays must be"),
        (lambda p: p["arrays"].__setitem__("values", Array(np.zeros(17))), "not a valid payload"),  # float64
        (lambda p: p["layout"].__setitem__("names", ["x.lora_A.weight", "other", "head.bias"]), "1 unexpected"),
    ],
)
def test_foreign_arrays_and_names_are_refused(change, message):
    payload = wire.encode(_small())
    change(payload)
    with pytest.raises(wire.WireError, match=message):
        wire.decode(payload["arrays"], payload["layout"], _expected(_small()))


@pytest.mark.parametrize(
    "config_change, message",
    [
        ({"steps": wire.MAX_ZO_STEPS + 1}, "steps must be 1 to"),
        ({"samples": wire.MAX_ZO_SAMPLES + 1}, "samples 1 to"),
        ({"steps": 2.0}, "steps must be 1 to"),
        ({"weight-decay": float("nan")}, "weight-decay must be a finite float"),
        ({"steps": 3}, "not a valid payload"),  # the bytes hold 2 steps
    ],
)
def test_zo_seed_payloads_are_bounded_and_sized_before_they_are_read(config_change, message, numpy_calls):
    records = wire.encode_seeds([ZOStep(0.01, [1, 2], [0.5, -0.5]), ZOStep(0.02, [3, 4], [0.1, 0.2])], 0.0)
    config = ConfigRecord({**dict(records["zo-config"]), **config_change})
    with pytest.raises(wire.WireError, match=message):
        wire.decode_seeds(records["zo"], config)
    assert numpy_calls == []


HEAD = {"classifier.weight": (3, 7), "classifier.bias": (3,)}


def _probe_bytes() -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    head = {"classifier.weight": torch.randn(3, 7, generator=generator), "classifier.bias": torch.randn(3, generator=generator)}
    return wire.encode_head_probe(head)[wire.HEAD_PROBE]["packed"].numpy()


def test_a_head_probe_is_the_centred_head_and_predicts_what_the_fitted_head_predicts():
    generator = torch.Generator().manual_seed(1)
    head = {"classifier.weight": 3 * torch.randn(4, 7, generator=generator), "classifier.bias": torch.randn(4, generator=generator) + 5}
    back = wire.decode_head_probe(wire.encode_head_probe(head)[wire.HEAD_PROBE], {n: tuple(v.shape) for n, v in head.items()})
    step = max((v - v.mean(0)).abs().max().item() for v in head.values()) / 127
    for name, value in head.items():
        torch.testing.assert_close(back[name], value - value.mean(0), atol=step * len(value), rtol=0)  # class 0 sums C-1 roundings
        assert back[name].sum(0).abs().max() < 1e-5  # centred: the rows sum to zero
    features = torch.randn(200, 7, generator=generator)
    logits = [features @ h["classifier.weight"].T + h["classifier.bias"] for h in (head, back)]
    margins = [value - value.mean(1, keepdim=True) for value in logits]  # logits up to one shift per example
    torch.testing.assert_close(margins[1], margins[0], atol=0.2, rtol=0)
    assert (logits[0].argmax(1) == logits[1].argmax(1)).float().mean() > 0.97


@settings(max_examples=300, deadline=None, database=None)
@example(values=_probe_bytes(), extra=False)
@given(
    values=st.one_of(
        st.binary(max_size=120).map(lambda raw: np.frombuffer(raw, np.uint8)),
        st.lists(st.floats(width=32, allow_nan=True), max_size=40).map(lambda xs: np.array(xs, np.float32)),
        st.lists(st.integers(-128, 127), max_size=60).map(lambda xs: np.array(xs, np.int8)),
    ),
    extra=st.booleans(),
)
def test_any_head_probe_payload_decodes_to_the_head_or_is_refused(values, extra):
    """A probe is untrusted bytes: either exactly the head's shapes, centred, or a WireError."""
    arrays = ArrayRecord({"packed": Array(values), **({"more": Array(np.zeros(1, np.uint8))} if extra else {})})
    try:
        head = wire.decode_head_probe(arrays, HEAD)
    except wire.WireError:
        return
    assert not extra and values.dtype == np.uint8 and len(values) == 2 * 7 + 2 + 4  # 16 codes, one scale
    assert {name: tuple(value.shape) for name, value in head.items()} == HEAD
    assert all(value.sum(0).abs().max() <= 1e-3 * (1 + value.abs().max()) for value in head.values())  # centred


def test_a_head_probe_of_another_head_is_refused_before_it_is_read(numpy_calls):
    big = wire.encode_head_probe({"classifier.weight": torch.ones(30, 7), "classifier.bias": torch.ones(30)})
    with pytest.raises(wire.WireError, match="not a valid payload"):
        wire.decode_head_probe(big[wire.HEAD_PROBE], HEAD)
    assert numpy_calls == []
    with pytest.raises(wire.WireError, match="class axis"):
        wire.decode_head_probe(big[wire.HEAD_PROBE], {"classifier.weight": (1, 7)})
