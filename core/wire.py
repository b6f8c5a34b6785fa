"""How adapter tensors travel in a Flower message: packed, optionally compressed.

Flower stores and transfers every ``Array`` of an ``ArrayRecord`` as an object of its own;
in deployment each object is a separate authenticated request to the SuperLink. A LoRA
adapter has dozens of small tensors, so one-array-per-tensor made a message take seconds
on loopback. Here all tensors of a message go into one flat array (``values``), their
names and shapes into a ``layout`` record, so a message is a handful of objects whatever
the adapter's size.

Codecs (``federation.compression``), applied to uploads and broadcasts alike:

- ``none``: float32, exact.
- ``fp16``: half precision; relative error <= 2^-11 within fp16's range.
- ``int8``: blockwise absmax quantization, ``BLOCK`` values per block share one float32
  scale (absmax / 127); absolute error <= scale / 2 per value. 1.03 bytes per value.

A zeroth-order client with ``client.zo_upload: seeds`` sends no tensors at all: its
steps' seeds, projected gradients and learning rates (``zo`` + ``zo-config``), exact,
which the coordinator replays (core/spsa.py): 12 bytes per perturbation, 4 per step.
Its first round sends the head it fitted in closed form (``probe``): int8, one array,
no layout (the receiver knows the head's names and shapes), centred over the classes with
class 0's row left out (the rows then sum to zero, so the receiver restores it).

A receiver treats every payload as untrusted: the layout is checked (and, given
``expected``, matched against the tensors it allows) and each array's declared dtype,
length and byte size are compared with it before a byte of it is read. Refusals
(``WireError``) name the fault, never the sender's values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune.core.flower_internals import get_all_nested_objects
from fedtune.core.spsa import ZOStep, pack, unpack

Tensors = dict[str, torch.Tensor]
CODECS = ("none", "fp16", "int8")
RESIDUAL_ARRAYS, RESIDUAL_LAYOUT = "residual", "residual-layout"  # FLoRA / FedEx-LoRA base residuals in a message
HEAD_PROBE = "probe"  # the array record of a reply that sends only a fitted head (a ZO client's round 1)
RUN_FINISHED = "run-finished"  # ``event`` of the query message that tells agents a run is over
BLOCK = 128
DTYPES = {"none": "float32", "fp16": "float16", "int8": "int8"}  # codec -> dtype of its values
MAX_TENSORS = 4096  # names in one layout; a 70B model's LoRA adapter has about a thousand
MAX_NAME = 256  # characters in one tensor name
MAX_NDIM = 8
MAX_VALUES = 2**31 - 1  # values in one payload when the receiver expects no particular tensors
NPY_HEADER = 4096  # bytes a .npy header may add to a flat array's data (numpy writes 128)
MAX_ZO_STEPS, MAX_ZO_SAMPLES = 100_000, 64


class WireError(ValueError):
    """A payload that does not decode (a malformed or foreign message)."""


def payload_bytes(content: RecordDict) -> int:
    """Bytes Flower transfers for a message's content: its deflated object tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def encode(tensors: Tensors, codec: str = "none") -> dict[str, ArrayRecord | ConfigRecord]:
    """``{"arrays": ArrayRecord, "layout": ConfigRecord}`` to merge into a message's content."""
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r}: use one of {', '.join(CODECS)}")
    names = list(tensors)
    flat = torch.cat([tensors[n].detach().reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
    arrays: dict[str, Array] = {}
    if codec == "none":
        arrays["values"] = Array(flat.numpy())
    elif codec == "fp16":
        arrays["values"] = Array(flat.half().numpy())
    else:
        codes, scales = quantize_int8(flat)
        arrays["values"], arrays["scales"] = Array(codes.numpy()), Array(scales.numpy())
    layout = ConfigRecord(
        {
            "codec": codec,
            "names": names,
            "ndims": [tensors[n].dim() for n in names],
            "shape": [int(d) for n in names for d in tensors[n].shape],
        }
    )
    return {"arrays": ArrayRecord(arrays), "layout": layout}


def decode_residual(content: RecordDict, expected: Mapping[str, tuple[int, ...]]) -> Tensors:
    """The base residuals a coordinator message carries (none when it carries none), checked against EXPECTED."""
    if RESIDUAL_ARRAYS not in content.array_records:
        return {}
    if RESIDUAL_LAYOUT not in content.config_records:
        raise WireError(f"'{RESIDUAL_ARRAYS}' without '{RESIDUAL_LAYOUT}'")
    return decode(content[RESIDUAL_ARRAYS], content[RESIDUAL_LAYOUT], expected)


def decode(arrays: ArrayRecord, layout: ConfigRecord, expected: Mapping[str, tuple[int, ...]] | None = None) -> Tensors:
    """Float32 tensors by name, as they were given to ``encode`` (up to the codec's error).

    ``expected`` (name -> shape) is what the receiver accepts: any other names or shapes
    are refused before the payload is read, so an oversized one costs neither memory nor time.
    """
    codec, names, shapes = read_layout(layout)
    if expected is not None:
        match_expected(names, shapes, expected)
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) > MAX_VALUES:
        raise WireError("layout: too many values")
    wanted = {"values", "scales"} if codec == "int8" else {"values"}
    if set(arrays.keys()) != wanted:
        raise WireError(f"not a fedtune tensor payload (arrays must be {sorted(wanted)})")
    values = torch.from_numpy(read_array(arrays, "values", DTYPES[codec], sum(sizes)).copy())
    if codec == "int8":
        scales = read_array(arrays, "scales", "float32", math.ceil(sum(sizes) / BLOCK))
        flat = dequantize_int8(values, torch.from_numpy(scales.copy()))
    else:
        flat = values.float()
    return {name: part.reshape(shape) for name, part, shape in zip(names, flat.split(sizes), shapes)}


def read_layout(layout: ConfigRecord) -> tuple[str, list[str], list[tuple[int, ...]]]:
    """Codec, names and shapes of a ``layout`` record, refused unless well-formed and bounded."""
    try:
        codec, names, ndims, dims = (layout[key] for key in ("codec", "names", "ndims", "shape"))
    except KeyError as err:
        raise WireError("not a fedtune tensor payload (layout needs codec, names, ndims and shape)") from err
    if not isinstance(codec, str) or codec not in DTYPES:
        raise WireError(f"layout: codec must be one of {', '.join(CODECS)}")
    if not (_all(names, str) and _all(ndims, int) and _all(dims, int)):
        raise WireError("layout: names must be strings, ndims and shape integers")
    if len(names) > MAX_TENSORS or any(not 0 < len(name) <= MAX_NAME for name in names):
        raise WireError(f"layout: at most {MAX_TENSORS} names of 1 to {MAX_NAME} characters")
    if any(not 0 <= ndim <= MAX_NDIM for ndim in ndims) or any(d < 0 for d in dims):
        raise WireError(f"layout: ndims must be 0 to {MAX_NDIM}, dimensions non-negative")
    if len(ndims) != len(names) or sum(ndims) != len(dims) or len(set(names)) != len(names):
        raise WireError("layout: names, ndims and shape do not agree")
    shapes, offset = [], 0
    for ndim in ndims:
        shapes.append(tuple(dims[offset : offset + ndim]))
        offset += ndim
    return codec, list(names), shapes


def match_expected(names: list[str], shapes: list[tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """``WireError`` unless the layout holds exactly the expected tensors; names only the receiver's."""
    if set(names) != set(expected):
        unexpected, missing = len(set(names) - set(expected)), sorted(set(expected) - set(names))
        raise WireError(f"wrong tensors ({unexpected} unexpected, missing {missing[:3]})")
    for name, shape in zip(names, shapes):
        if shape != tuple(expected[name]):
            raise WireError(f"{name}: wrong shape, expected {tuple(expected[name])}")


def read_array(arrays: ArrayRecord, key: str, dtype: str, count: int) -> np.ndarray:
    """The flat ``count`` values of ``dtype`` in ``arrays[key]``: metadata and byte size first, then the bytes."""
    array, nbytes = arrays[key], count * np.dtype(dtype).itemsize
    if not (
        isinstance(array, Array)
        and array.dtype == dtype
        and tuple(array.shape) == (count,)
        and isinstance(array.data, bytes)
        and nbytes <= len(array.data) <= nbytes + NPY_HEADER
    ):
        raise WireError(f"'{key}' is not a valid payload of {count} {dtype} values")
    try:
        values = array.numpy()
    except (TypeError, ValueError) as err:
        raise WireError(f"'{key}' is not a numpy array") from err
    if values.dtype != np.dtype(dtype) or values.shape != (count,):
        raise WireError(f"'{key}' is not a valid payload of {count} {dtype} values")
    return values


def _all(values: object, kind: type) -> bool:
    """``values`` is a list of ``kind`` (bools are not integers here)."""
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def encode_seeds(steps: list[ZOStep], weight_decay: float) -> dict[str, ArrayRecord | ConfigRecord]:
    """A ZO client's round: ``zo`` (seeds, grads, lrs packed) and ``zo-config`` (counts, weight decay)."""
    config = {"steps": len(steps), "samples": len(steps[0].seeds) if steps else 0, "weight-decay": float(weight_decay)}
    return {"zo": ArrayRecord({"packed": Array(pack(steps))}), "zo-config": ConfigRecord(config)}


def seed_payload_bytes(steps: int, samples: int) -> int:
    """Bytes of STEPS ZO steps of SAMPLES perturbations each: a seed and a projected gradient per
    perturbation, a learning rate per step (core/spsa.py's ``pack``)."""
    return 12 * steps * samples + 4 * steps


def decode_seeds(
    arrays: ArrayRecord, config: ConfigRecord, max_steps: int = MAX_ZO_STEPS, max_samples: int = MAX_ZO_SAMPLES
) -> tuple[list[ZOStep], float]:
    """``(steps, weight decay)`` from ``encode_seeds``' records; counts (at most MAX_STEPS steps of at most
    MAX_SAMPLES perturbations: replaying them is the receiver's work) and size are checked before reading."""
    try:
        steps, samples, weight_decay = (config[key] for key in ("steps", "samples", "weight-decay"))
    except KeyError as err:
        raise WireError("not a ZO seed payload (zo-config needs steps, samples and weight-decay)") from err
    if not (_all([steps, samples], int) and 1 <= steps <= max_steps and 1 <= samples <= max_samples):
        raise WireError(f"not a ZO seed payload (steps must be 1 to {max_steps}, samples 1 to {max_samples})")
    if not (isinstance(weight_decay, float) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise WireError("not a ZO seed payload (weight-decay must be a finite float >= 0)")
    if set(arrays.keys()) != {"packed"}:
        raise WireError("not a ZO seed payload (arrays must be ['packed'])")
    packed = read_array(arrays, "packed", "uint8", seed_payload_bytes(steps, samples))
    try:
        return unpack(packed, steps, samples), weight_decay
    except ValueError as err:
        raise WireError(f"not a ZO seed payload ({err})") from err


def encode_head_probe(head: Tensors) -> dict[str, ArrayRecord]:
    """``{"probe": ArrayRecord}``: HEAD's tensors (class axis first) centred over the classes, less
    class 0's row, in name order, int8.

    Centring changes no prediction of a softmax head (every class's logit moves by the same
    amount), it is the smallest head that predicts the same, and it is the form a backprop
    client's head keeps (cross-entropy gradients sum to zero over the classes), so a probe
    weighs like any head in norm bounds and coordinate statistics. The centred rows sum to
    zero, so class 0's row need not travel: half the bytes of SST-2's head.
    """
    tensors = {name: value.detach().float().cpu() for name, value in head.items()}
    flat = torch.cat([(tensors[name] - tensors[name].mean(0))[1:].reshape(-1) for name in sorted(tensors)])
    codes, scales = quantize_int8(flat)
    packed = np.concatenate([codes.numpy().view(np.uint8), scales.numpy().astype("<f4").view(np.uint8)])
    return {HEAD_PROBE: ArrayRecord({"packed": Array(packed)})}


def decode_head_probe(arrays: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> Tensors:
    """The centred head ``encode_head_probe`` sent (class 0's row = minus the others' sum); the
    payload's size, from EXPECTED's shapes, is checked before a byte is read."""
    if set(arrays.keys()) != {"packed"}:
        raise WireError("not a head probe (arrays must be ['packed'])")
    if any(len(shape) < 1 or shape[0] < 2 for shape in expected.values()):
        raise WireError("a head probe needs tensors with a class axis of at least 2")
    sizes = {n: math.prod(expected[n][1:]) * (expected[n][0] - 1) for n in sorted(expected)}
    count = sum(sizes.values())
    packed = read_array(arrays, "packed", "uint8", count + 4 * math.ceil(count / BLOCK))
    codes = torch.from_numpy(packed[:count].view(np.int8).copy())
    flat = dequantize_int8(codes, torch.from_numpy(packed[count:].view("<f4").copy()))
    head, offset = {}, 0
    for name, size in sizes.items():
        rows = flat[offset : offset + size].reshape(expected[name][0] - 1, *expected[name][1:])
        head[name] = torch.cat([-rows.sum(0, keepdim=True), rows])
        offset += size
    return head


def quantize_int8(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8 codes and one float32 scale per ``BLOCK`` values."""
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).reshape(-1, BLOCK)
    scales = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: flat.numel()], scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if scales.numel() != math.ceil(codes.numel() / BLOCK):
        raise WireError(f"int8 payload: {scales.numel()} scales for {codes.numel()} values (block {BLOCK})")
    padded = torch.nn.functional.pad(codes.float(), (0, (-codes.numel()) % BLOCK)).reshape(-1, BLOCK)
    return (padded * scales.float()[:, None]).reshape(-1)[: codes.numel()]


def sealed(records: dict[str, Any], nonce: str) -> RecordDict:
    """RECORDS as a message's content, each config record (the layouts, the round's config) with NONCE.

    A SuperLink keeps the child list of an object id from the first tree that names it, so an agent who
    could compute the id of an object the coordinator is about to send (a layout is the same every round)
    could register it first with children that never arrive, and stall every client."""
    return RecordDict({k: ConfigRecord({**dict(v), "nonce": nonce}) if isinstance(v, ConfigRecord) else v for k, v in records.items()})
