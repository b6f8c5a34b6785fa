"""Quantization of an exported ONNX model with onnxruntime's own tools.

``int8``, classifiers: schemes tried in order until the export's quality gate holds
(``int8_classifier``): (1) onnxruntime's dynamic quantization: MatMul weights int8 per
output channel, activations quantized on the fly (MatMulInteger, fast on CPUs), and the
embedding tables int8; (2) static QDQ int8 (``quantize_static``): activation ranges
calibrated on held-out examples instead of taken per batch; (3) the same with per-channel
weights; (4) the most accurate of those three (on a tie the earlier: it quantizes fewer
activations, so keeping MatMuls in float repairs it sooner; a static scheme still
quantizes the attention inputs beside a float MatMul) with the most sensitive MatMuls
kept in float, 1, 2, 4, ... of them, until the gate holds (``sensitive_matmuls`` ranks them by how badly int8
treats their input on the calibration examples). (8-bit
MatMulNBits gives the same size but has no fast CPU kernel in onnxruntime 1.32: it
measured 2.6x slower than PyTorch.) ``int8``, causal LMs:
weight-only 8-bit MatMulNBits, because quantizing activations broke SmolLM2-135M
(next-token agreement 0.45). ``int4``: weight-only MatMulNBits at 4 bit (blocks of 32,
symmetric) for MatMuls and, for encoders, 4-bit GatherBlockQuantized embeddings.
Causal LMs keep the token embedding and the output projection (``lm_head``, tied to
it in SmolLM2) in full precision: they are where weight quantization of small LMs hurts
next-token agreement most, and they are one shared table.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

BLOCK_SIZE = 32
LM_FULL_PRECISION = ("embed_tokens", "lm_head")


def kept_nodes(model: onnx.ModelProto, task: str) -> list[str]:
    """Nodes left in full precision: the LM's token embedding and output projection."""
    if task == "classification":
        return []
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gather") and any(k in n.name for k in LM_FULL_PRECISION)
    ]


Feeds = list[dict[str, np.ndarray]]
Check = Callable[[Path], tuple[bool, dict]]  # a candidate model -> (gate holds, gate record)


class _Feeds(CalibrationDataReader):
    """Calibration batches for onnxruntime, replayable (its tools read a reader more than once)."""

    def __init__(self, feeds: Feeds) -> None:
        self.feeds, self._next = feeds, iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self.feeds)


def int8_classifier(source: Path, target: Path, calibration: Feeds, check: Check, external_data: bool) -> dict:
    """The first int8 scheme whose model passes CHECK, written to TARGET (see the module docstring).

    Returns the manifest's record: the scheme, every attempt with its gate, the nodes kept in
    float and why. If none passes, ``passed`` is False and TARGET holds the last attempt."""
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    attempts: list[dict] = []

    def attempt(scheme: str, quantize: Callable[[Path, list[str]], None], exclude: list[str]) -> bool:
        quantize(target, exclude)
        passed, gate = check(target)
        attempts.append({"scheme": scheme, "passed": passed, **gate})
        return passed

    schemes: dict[str, Callable[[Path, list[str]], None]] = {
        "dynamic": lambda out, exclude: _dynamic(source, out, exclude, external_data),
        "static": lambda out, exclude: _static(source, out, calibration, False, exclude, external_data),
        "static-per-channel": lambda out, exclude: _static(source, out, calibration, True, exclude, external_data),
    }
    for scheme, quantize in schemes.items():
        if attempt(scheme, quantize, []):
            return {"scheme": scheme, "passed": True, "attempts": attempts, "kept_full_precision": [], "why_kept": {}}
    best = min(attempts, key=lambda a: a.get("accuracy_drop_points", 0.0))  # the first of equals: see the docstring
    ranked = sensitive_matmuls(source, calibration)
    if not ranked:
        return {"scheme": attempts[-1]["scheme"], "passed": False, "attempts": attempts, "kept_full_precision": [], "why_kept": {}}
    count = 1
    while True:
        kept = [node for node, _ in ranked[:count]]
        scheme = f"{best['scheme']}, {len(kept)} MatMul(s) in float"
        if attempt(scheme, schemes[best["scheme"]], kept) or count >= len(ranked):
            total = len(ranked)
            why = {
                node: f"int8 error of its input, per channel: {noise:.3g} (among the {len(kept)} worst of {total} MatMuls)"
                for node, noise in ranked[:count]
            }
            passed = attempts[-1]["passed"]
            return {"scheme": scheme, "passed": passed, "attempts": attempts, "kept_full_precision": kept, "why_kept": why}
        count *= 2


def sensitive_matmuls(source: Path, calibration: Feeds) -> list[tuple[str, float]]:
    """MatMul nodes of SOURCE by how badly per-tensor int8 treats their input, worst first.

    The score of an input activation x (on the calibration feeds, read by making it a graph
    output) is the mean over its channels c of ‖x_c − Q(x)_c‖² / ‖x_c‖², with Q
    uint8 quantization over the tensor's min-max range. A tensor-wide signal-to-noise ratio is
    blind to the case that hurts: one outlier channel sets the range and every other channel
    is rounded to a few levels (outlier features, Dettmers et al. 2022); per channel it shows."""
    import onnxruntime as ort

    model = onnx.load(str(source))
    weights = {init.name for init in model.graph.initializer}
    inputs = {n.name: n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[0] not in weights}
    names = sorted(set(inputs.values()))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    with tempfile.TemporaryDirectory() as work:
        augmented = Path(work) / "float.onnx"
        onnx.save(model, str(augmented), save_as_external_data=True, location="weights.data")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        per_batch = {name: [] for name in names}  # scored batch by batch: activations are not kept
        for feed in calibration:
            for name, value in zip(names, session.run(names, feed)):
                per_batch[name].append(_channel_noise(value))
    scores = {node: float(np.mean(per_batch[tensor])) for node, tensor in inputs.items()}
    return sorted(scores.items(), key=lambda item: -item[1])


def _channel_noise(batch: np.ndarray) -> float:
    """Mean per-channel relative error of uint8 min-max quantization of BATCH (last axis: channels)."""
    values = batch.reshape(-1, batch.shape[-1]).astype(np.float64)
    low, high = min(values.min(), 0.0), max(values.max(), 0.0)
    scale = (high - low) / 255 or 1.0
    error = values - (np.round((values - low) / scale) * scale + low)
    return float(np.mean(np.square(error).sum(0) / np.maximum(np.square(values).sum(0), 1e-30)))


def _dynamic(source: Path, target: Path, exclude: list[str], external_data: bool) -> None:
    quantize_dynamic(
        source,
        target,
        op_types_to_quantize=["MatMul", "Gather"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=exclude,
        use_external_data_format=external_data,
    )


def _static(
    source: Path, target: Path, calibration: Feeds, per_channel: bool, exclude: list[str], external_data: bool
) -> None:
    """QDQ int8: uint8 activations with calibrated (min-max) ranges, int8 symmetric weights."""
    quantize_static(
        source,
        target,
        _Feeds(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gather"],
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        use_external_data_format=external_data,
    )


def method(mode: str, task: str) -> str:
    """What ``quantize_model`` does for MODE and TASK, in words for the manifest."""
    if mode == "none":
        return "none (fp32)"
    if mode == "int8" and task == "classification":
        return "int8: the first scheme that passes the quality check, of dynamic, static QDQ, static QDQ per-channel, and that with the most sensitive MatMuls in float (see scheme and attempts)"
    return f"weight-only {mode} (onnxruntime MatMulNBits; activations stay fp32)"


def quantize_model(source: Path, target: Path, mode: str, task: str, external_data: bool) -> list[str]:
    """Write a weight-only quantized copy of ``source`` (int4; int8 for causal LMs); return the nodes
    kept in fp32. Classifiers' int8 is ``int8_classifier``."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    model = onnx.load(str(source))
    keep = kept_nodes(model, task)
    op_types = ["MatMul", "Gather"] if task == "classification" else ["MatMul"]
    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        bits=8 if mode == "int8" else 4,
        op_types_to_quantize=tuple(op_types),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=keep, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), external_data)
    return keep
