"""The edge runtime: run fedtune bundles with onnxruntime, numpy and tokenizers only.

Importing ``edge`` never imports torch or transformers (the exporter lives in
``edge.export`` and is imported only by ``fedtune export``).
"""

from fedtune.edge.runtime import Bundle, EdgeError, Prediction, bench

__all__ = ["Bundle", "EdgeError", "Prediction", "bench"]
