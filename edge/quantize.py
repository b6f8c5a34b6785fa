"""Quantization of an exported ONNX model with onnxruntime's own tools.

``int8``, classifiers: onnxruntime's dynamic quantization: MatMul weights int8 per
output channel, activations quantized on the fly (MatMulInteger, fast on CPUs), and the
embedding tables int8. (8-bit MatMulNBits gives the same size but has no fast CPU kernel
in onnxruntime 1.32: it measured 2.6x slower than PyTorch.) ``int8``, causal LMs:
weight-only 8-bit MatMulNBits, because quantizing activations broke SmolLM2-135M
(next-token agreement 0.45). ``int4``: weight-only MatMulNBits at 4 bit (blocks of 32,
symmetric) for MatMuls and, for encoders, 4-bit GatherBlockQuantized embeddings.
Causal LMs keep the token embedding and the output projection (``lm_head``, tied to
it in SmolLM2) in full precision: they are where weight quantization of small LMs hurts
next-token agreement most, and they are one shared table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
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


def method(mode: str, task: str) -> str:
    """What ``quantize_model`` does for MODE and TASK, in words for the manifest."""
    if mode == "none":
        return "none (fp32)"
    if mode == "int8" and task == "classification":
        return "dynamic int8 (onnxruntime quantize_dynamic: int8 weights per channel, activations quantized at run time)"
    return f"weight-only {mode} (onnxruntime MatMulNBits; activations stay fp32)"


def quantize_model(source: Path, target: Path, mode: str, task: str, external_data: bool) -> list[str]:
    """Write a quantized copy of ``source``; return the nodes kept in fp32."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" advice
    model = onnx.load(str(source))
    keep = kept_nodes(model, task)
    op_types = ["MatMul", "Gather"] if task == "classification" else ["MatMul"]
    if mode == "int8" and task == "classification":
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=op_types,
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=keep,
            use_external_data_format=external_data,
        )
        return keep
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
