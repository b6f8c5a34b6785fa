"""Weight-only quantization of an exported ONNX model with onnxruntime's own tools.

``int8``: MatMul weights become MatMulNBits (8 bit, blocks of 32, symmetric) and, for
encoders, the embedding tables become int8 with a DequantizeLinear (ORT's quantizer on
``Gather``). ``int4``: MatMulNBits at 4 bit for MatMuls and, for encoders, 4-bit
GatherBlockQuantized embeddings. Causal LMs keep the token embedding and the output
projection (``lm_head``, tied to it in SmolLM2) in full precision: they are where
weight quantization of small LMs hurts next-token agreement most, and they are one
shared table.
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


def quantize_model(source: Path, target: Path, mode: str, task: str, external_data: bool) -> list[str]:
    """Write a weight-only quantized copy of ``source``; return the nodes kept in fp32."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    model = onnx.load(str(source))
    keep = kept_nodes(model, task)
    bits = 8 if mode == "int8" else 4
    op_types = ("MatMul", "Gather") if (task == "classification" and bits == 4) else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        bits=bits,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=keep, algo_config=config)
    quantizer.process()
    if bits == 8 and task == "classification":
        staged = target.with_name("matmul8.onnx")
        quantizer.model.save_model_to_file(str(staged), False)
        quantize_dynamic(staged, target, op_types_to_quantize=["Gather"], weight_type=QuantType.QInt8)
        staged.unlink()
    else:
        quantizer.model.save_model_to_file(str(target), external_data)
    return keep
