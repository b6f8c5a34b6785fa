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
which the coordinator replays (fedtune/zo.py): 12 bytes per perturbation, 4 per step.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedtune.zo import ZOStep, pack, unpack

Tensors = dict[str, torch.Tensor]
CODECS = ("none", "fp16", "int8")
BLOCK = 128


class WireError(ValueError):
    """A payload that does not decode (a malformed or foreign message)."""


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


def decode(arrays: ArrayRecord, layout: ConfigRecord) -> Tensors:
    """Float32 tensors by name, as they were given to ``encode`` (up to the codec's error)."""
    try:
        codec, names = str(layout["codec"]), list(layout["names"])
        ndims, dims = [int(d) for d in layout["ndims"]], [int(d) for d in layout["shape"]]
        values = torch.from_numpy(arrays["values"].numpy().copy())
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"not a fedtune tensor payload ({err})") from err
    if codec == "none" and values.dtype == torch.float32:
        flat = values
    elif codec == "fp16" and values.dtype == torch.float16:
        flat = values.float()
    elif codec == "int8" and values.dtype == torch.int8 and "scales" in arrays:
        flat = dequantize_int8(values, torch.from_numpy(arrays["scales"].numpy().copy()))
    else:
        raise WireError(f"codec {codec!r} with {values.dtype} values is not a valid payload")
    if len(ndims) != len(names) or sum(ndims) != len(dims) or len(set(names)) != len(names):
        raise WireError("layout: names, ndims and shape do not agree")
    shapes, offset = [], 0
    for ndim in ndims:
        shapes.append(tuple(dims[offset : offset + ndim]))
        offset += ndim
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.numel():
        raise WireError(f"layout describes {sum(sizes)} values, payload has {flat.numel()}")
    return {name: part.reshape(shape) for name, part, shape in zip(names, flat.split(sizes), shapes)}


def encode_seeds(steps: list[ZOStep], weight_decay: float) -> dict[str, ArrayRecord | ConfigRecord]:
    """A ZO client's round: ``zo`` (seeds, grads, lrs packed) and ``zo-config`` (counts, weight decay)."""
    config = {"steps": len(steps), "samples": len(steps[0].seeds) if steps else 0, "weight-decay": float(weight_decay)}
    return {"zo": ArrayRecord({"packed": Array(pack(steps))}), "zo-config": ConfigRecord(config)}


def decode_seeds(arrays: ArrayRecord, config: ConfigRecord) -> tuple[list[ZOStep], float]:
    """``(steps, weight decay)`` from ``encode_seeds``' records."""
    try:
        steps = unpack(arrays["packed"].numpy(), int(config["steps"]), int(config["samples"]))
        return steps, float(config["weight-decay"])
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"not a ZO seed payload ({err})") from err


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
