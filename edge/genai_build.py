"""A merged causal LM as an onnxruntime-genai model: the library's model builder does the work.

onnxruntime-genai's builder writes a decoder graph with fused attention (GroupQueryAttention
with a shared KV-cache buffer) and ``genai_config.json``, which its generator reads to run
greedy or sampled decoding with the KV cache: the loop fedtune used to write by hand. The
builder reads a Hugging Face model directory, so the merged model is saved to a scratch
directory first. Its graph is an ordinary ONNX model: the export's parity and quality
checks run it with plain onnxruntime, and the usual weight-only quantization applies.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedtune.core.errors import UserError
from fedtune.edge.runtime import GENAI_CONFIG


def save_for_builder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path) -> Path:
    """MODEL and TOKENIZER as the Hugging Face directory the builder reads."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_decoder(source: Path, out: Path, scratch: Path, adapter: Path | None = None) -> Path:
    """Write the model in SOURCE (a Hugging Face directory; with ADAPTER, a peft adapter directory
    kept unmerged) as ``out/model.onnx`` (+ weights) and ``out/genai_config.json``; return the model path."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options  # export only: imports torch

    options = [f"adapter_path={adapter}"] if adapter else []
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # per-tensor progress lines
            where = ("model", str(source), str(out), "fp32", "cpu", str(scratch / "builder-cache"))
            create_model(*where, **parse_extra_options(*where, options))
    except NotImplementedError as err:
        raise UserError(
            f"onnxruntime-genai cannot build this decoder ({err}); "
            "its builder supports Llama, Mistral, Phi, Qwen, Gemma and similar architectures"
        ) from None
    if not (out / GENAI_CONFIG).is_file():
        raise UserError(f"onnxruntime-genai's builder wrote no {GENAI_CONFIG}: {log.getvalue()[-300:]}")
    return out / "model.onnx"
