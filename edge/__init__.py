"""The edge runtime: run fedtune bundles with onnxruntime (onnxruntime-genai for causal LMs),
numpy and tokenizers only.

Importing ``edge`` never imports torch or transformers (the exporters live in ``edge.export``,
``edge.adapters``, ``edge.lm_adapters`` and ``edge.gguf_export``, imported only by
``fedtune export``), nor onnxruntime-genai until a causal-LM bundle is loaded.
"""

from fedtune.edge.runtime import Bundle, EdgeError, Prediction, bench

__all__ = ["Bundle", "EdgeError", "Prediction", "bench"]
