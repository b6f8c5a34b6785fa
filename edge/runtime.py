"""Running an exported bundle with onnxruntime (and onnxruntime-genai for causal LMs), numpy
and tokenizers only (no torch).

    from fedtune.edge import Bundle
    bundle = Bundle.load("bundles/sst2")
    bundle.classify(["a gripping, well acted film"])   # -> [Prediction(label, probabilities, name)]
    bundle.generate("Review: dull plot\\nSentiment:", max_new_tokens=8)   # causal LM

A bundle directory holds ``model.onnx`` (+ ``model.onnx.data`` when large), the
tokenizer files and ``manifest.json``; ``Bundle.load`` checks the manifest's sha256 of
every model file before creating the session, so a corrupted file is a clear error.
A causal-LM bundle also holds ``genai_config.json`` (checksummed too: it names the model
file) and generates with onnxruntime-genai's generator (KV cache, greedy or sampling).
A bundle with one adapter per client (``fedtune export --clients``) also holds
``adapters/*.npz`` (classifiers) or ``adapters/*.onnx_adapter`` (causal LMs);
``bundle.with_client(NAME)`` is the same loaded base with that client's adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from fedtune.core.errors import UserError

if TYPE_CHECKING:  # imported when a causal-LM bundle is used: classifier-only devices need not have it
    import onnxruntime_genai as og

MANIFEST = "manifest.json"
ADAPTER_DIR = "adapters"  # per-client adapter bundles: adapters/shared.npz and adapters/<client>.npz
SHARED_ADAPTER = "shared.npz"
GENAI_CONFIG = "genai_config.json"  # causal LMs: onnxruntime-genai's model description
GENAI_SESSION_OPTIONS = {"log_id", "provider_options"}  # what the builder writes; nothing that loads code
LM_ADAPTER_SUFFIX = ".onnx_adapter"  # causal LMs: adapters/<client>.onnx_adapter, onnxruntime's adapter format
CLIENT_NAME = re.compile(r"[\w.-]{1,64}")  # as the coordinator admits client names; never a path


class EdgeError(UserError):
    """A bundle that cannot be used as asked (missing, corrupted, wrong task)."""


@dataclass
class Prediction:
    label: str  # as in the training data
    probabilities: dict[str, float]
    name: str  # the class name from the config's data.label_words, else the label


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    session: ort.InferenceSession | og.Model  # a classifier's session, a causal LM's generator model
    tokenizer: Tokenizer
    adapter: dict[str, np.ndarray] = field(default_factory=dict)  # inputs of an adapter bundle
    client: str | None = None  # whose adapter they are
    _verified: dict[str, Any] = field(default_factory=dict, repr=False)  # per client, shared by with_client copies
    _generator_adapters: list[og.Adapters] = field(default_factory=list, repr=False)  # causal LMs: one, made on first use

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, threads: int | None = None) -> Bundle:
        path = Path(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise EdgeError(f"{path}: not a fedtune bundle (no {MANIFEST}); create one with fedtune export")
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as err:
            raise EdgeError(f"{manifest_file}: not valid JSON ({err})") from None
        if manifest.get("format") == "gguf":
            raise EdgeError(f"{path}: a GGUF adapter for llama.cpp; run it with {manifest.get('usage', 'llama-cli')}")
        if verify:
            for name, expected in manifest["sha256"].items():
                file = path / name
                if not file.is_file():
                    raise EdgeError(f"{file}: missing from the bundle")
                if sha256_file(file) != expected:
                    raise EdgeError(f"{file}: checksum mismatch with manifest.json (corrupted or modified file)")
        threads = threads or os.cpu_count() or 1
        try:
            if manifest["task"] == "causal-lm":
                session = _generator_model(path, manifest, threads)
            else:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.intra_op_num_threads = threads
                options.log_severity_level = 3
                session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            tokenizer.no_padding()
            if manifest["task"] == "classification":  # special tokens survive truncation, as in training
                tokenizer.enable_truncation(manifest["max_length"])
            else:
                tokenizer.no_truncation()
        except Exception as err:  # onnxruntime and tokenizers raise their own types
            raise EdgeError(f"{path}: cannot load the bundle ({str(err).splitlines()[0][:200]})") from None
        bundle = cls(path, manifest, session, tokenizer)
        return bundle.with_client(manifest["adapters"]["default"]) if "adapters" in manifest else bundle

    @property
    def clients(self) -> list[str]:
        """The clients whose adapters this bundle holds (empty for a single-model bundle)."""
        return list(self.manifest.get("adapters", {}).get("clients", []))

    def with_client(self, name: str) -> Bundle:
        """This bundle with client NAME's adapter: the loaded base is shared, only the adapter
        changes. Its files are checked and read once per client (``.npz`` with ``allow_pickle=False``)."""
        if not self.clients:
            raise EdgeError(f"{self.path}: one model for everyone; a bundle per client comes from fedtune export --clients")
        if name not in self.clients or not CLIENT_NAME.fullmatch(name):
            raise EdgeError(f"client {name!r}: not in {self.path} (clients: {', '.join(self.clients)})")
        if name not in self._verified:  # read and checked once; a switch afterwards only picks arrays
            self._verified[name] = self._read_adapter(name)
        if self.task == "causal-lm":
            return replace(self, client=name)
        return replace(self, adapter=self._verified[name], client=name)

    def _read_adapter(self, name: str) -> Any:
        if self.task == "causal-lm":  # onnxruntime-genai reads the file; the generator is told the name
            path = self._checked(f"{ADAPTER_DIR}/{name}{LM_ADAPTER_SUFFIX}")
            if not self._generator_adapters:
                import onnxruntime_genai as og

                self._generator_adapters.append(og.Adapters(self.session))
            self._generator_adapters[0].load(str(path), name)
            return self._generator_adapters[0]
        arrays = {}
        for file in (SHARED_ADAPTER, f"{name}.npz"):
            path = self._checked(f"{ADAPTER_DIR}/{file}")
            with np.load(path, allow_pickle=False) as stored:
                arrays |= {key: stored[key] for key in stored.files}
        inputs = {i.name: i for i in self.session.get_inputs()}
        for key, value in arrays.items():
            spec = inputs.get(key)
            if spec is None or value.dtype != np.float32 or list(value.shape) != list(spec.shape):
                raise EdgeError(f"{self.path}: client {name!r}'s adapter does not fit the model ({key})")
        if set(arrays) != set(self.manifest["adapters"]["inputs"]):
            raise EdgeError(f"{self.path}: client {name!r}'s adapter does not match the model's inputs")
        for value in arrays.values():
            value.flags.writeable = False  # shared by every copy that picks this client
        return arrays

    def _checked(self, name: str) -> Path:
        """The bundle file NAME, after checking it against the manifest (read now: check now)."""
        path = self.path / name
        if not path.is_file():
            raise EdgeError(f"{path}: missing from the bundle")
        if sha256_file(path) != self.manifest["sha256"].get(name):
            raise EdgeError(f"{path}: checksum mismatch with manifest.json (corrupted or modified file)")
        return path

    @property
    def task(self) -> str:
        return self.manifest["task"]

    def __repr__(self) -> str:
        quantization = self.manifest.get("quantization", {}).get("mode", "none")
        client = f", client={self.client!r}" if self.client else ""
        return f"Bundle({str(self.path)!r}, task={self.task!r}, quantization={quantization!r}{client})"

    # -- classification ------------------------------------------------------------
    def logits(self, texts: list[str]) -> np.ndarray:
        """Classifier logits for a batch of texts (right-padded, like training)."""
        self._require("classification")
        ids, mask = self._encode([self._encode_ids(t) for t in texts], left=False)
        return self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **self.adapter})[0]

    def classify(self, texts: list[str] | str) -> list[Prediction]:
        """One prediction per text (a single string is one text, not a list of characters)."""
        self._require("classification")
        texts = [texts] if isinstance(texts, str) else texts
        logits = self.logits(texts)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        labels, names = self.manifest["labels"], self.manifest.get("label_words") or {}
        predictions = []
        for p in probs:
            label = labels[int(p.argmax())]
            predictions.append(Prediction(label, dict(zip(labels, map(float, p))), names.get(label, label)))
        return predictions

    # -- causal LM -----------------------------------------------------------------
    def prompt(self, text: str) -> str:
        """The bundle's prompt template applied to ``text``."""
        return self.manifest.get("prompt", "{text}").format(text=text)

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, seed: int = 0
    ) -> list[int]:
        """Greedy (temperature 0) or sampled (top-k when TOP_K > 0) continuation up to EOS, by
        onnxruntime-genai's generator; SEED makes sampling repeatable."""
        self._require("causal-lm")
        import onnxruntime_genai as og

        if not prompt_ids:
            raise EdgeError("the prompt is empty: give some text to continue")
        if max_new_tokens < 1 or temperature < 0 or top_k < 0:
            raise EdgeError("max_new_tokens must be >= 1, temperature and top_k >= 0")
        limit = self.manifest["context_length"]
        if len(prompt_ids) + max_new_tokens > limit:
            raise EdgeError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of {limit}")
        # neutral search settings, whatever the base's generation config says: greedy is argmax
        search = {"max_length": len(prompt_ids) + max_new_tokens, "num_beams": 1, "min_length": 0}
        search |= {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "do_sample": temperature > 0}
        if temperature > 0:  # top_k 0 with top_p 1: the whole vocabulary
            search |= {"temperature": temperature, "top_k": min(top_k, self.manifest["vocab_size"]), "top_p": 1.0}
            search |= {"random_seed": seed}
        stops = set(self.manifest["eos_token_ids"])
        generated: list[int] = []
        try:
            params = og.GeneratorParams(self.session)
            params.set_search_options(**search)
            generator = og.Generator(self.session, params)
            if self.client is not None:
                generator.set_active_adapter(self._verified[self.client], self.client)
            generator.append_tokens([prompt_ids])
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in stops:
                    break
                generated.append(token)
        except RuntimeError as err:  # onnxruntime-genai's own errors
            raise EdgeError(f"{self.path}: generation failed ({str(err).splitlines()[0][:200]})") from None
        return generated

    def generate(
        self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, seed: int = 0
    ) -> str:
        ids = self.generate_ids(self._encode_ids(prompt), max_new_tokens, temperature, top_k, seed)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- helpers -------------------------------------------------------------------
    def _require(self, task: str) -> None:
        if self.task != task:
            raise EdgeError(f"{self.path}: a {self.task} bundle cannot do {task}")

    def _encode_ids(self, text: str) -> list[int]:
        """Token ids as in training: classifier inputs truncated at the end, prompts keep their end."""
        return self.tokenizer.encode(text).ids[-self.manifest["max_length"] :]

    def _encode(self, rows: list[list[int]], left: bool) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.manifest["pad_token_id"], np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        return ids, mask


def bench(
    bundle: Bundle, rows: list[dict[str, Any]], text_field: str, label_field: str, max_new_tokens: int = 8
) -> dict:
    """Accuracy (classification) or exact match (causal LM) and batch-1 latency over ``rows``."""
    missing = [field for field in (text_field, label_field) if rows and field not in rows[0]]
    if missing:
        raise UserError(f"no column {missing[0]!r} in the data (columns: {', '.join(rows[0])}); pass --text-field/--label-field")
    latencies, correct = [], 0
    label_words = bundle.manifest.get("label_words") or {}
    response = bundle.manifest.get("response", "{label}")
    for row in rows:
        text, truth = str(row[text_field]), str(row[label_field])
        started = time.perf_counter()
        if bundle.task == "classification":
            correct += bundle.classify([text])[0].label == truth
        else:
            expected = response.format(label=label_words.get(truth, truth)).strip()
            correct += bundle.generate(bundle.prompt(text), max_new_tokens).strip() == expected
        latencies.append(time.perf_counter() - started)
    ms = np.array(latencies) * 1000
    metric = "accuracy" if bundle.task == "classification" else "exact_match"
    return {
        metric: correct / len(rows),
        "examples": len(rows),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "throughput_per_s": round(len(rows) / float(np.sum(latencies)), 2),
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _generator_model(path: Path, manifest: dict[str, Any], threads: int) -> og.Model:
    """onnxruntime-genai's model for a causal-LM bundle, on CPU with THREADS threads.

    ``genai_config.json`` is checksummed, but a bundle may come from anyone: it may name
    ``model.onnx`` only, and no session option that would load code (custom op libraries)."""
    import onnxruntime_genai as og

    if GENAI_CONFIG not in manifest["sha256"]:
        raise EdgeError(f"{path}: a causal-LM bundle from an older fedtune (no {GENAI_CONFIG}); export it again")
    described = json.loads((path / GENAI_CONFIG).read_text())
    for key, value in _items(described):
        if key == "filename" and value != "model.onnx" or "custom_ops" in key:
            raise EdgeError(f"{path / GENAI_CONFIG}: {key} = {value!r} is not allowed in a bundle (only model.onnx, no custom ops)")
    for key, value in _items(described):  # every model part (decoder, embedding, vision, ...) has its own
        unknown = set(value) - GENAI_SESSION_OPTIONS if key == "session_options" and isinstance(value, dict) else set()
        if unknown or (key == "session_options" and not isinstance(value, dict)):
            raise EdgeError(f"{path / GENAI_CONFIG}: session options {sorted(unknown)} are not allowed in a bundle")
    config = og.Config(str(path))
    config.clear_providers()
    options = {"intra_op_num_threads": threads, "log_severity_level": 3}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def _items(tree: Any) -> list[tuple[str, Any]]:
    """Every (key, value) of a nested JSON document."""
    if isinstance(tree, dict):
        return [(k, v) for k, v in tree.items()] + [item for v in tree.values() for item in _items(v)]
    if isinstance(tree, list):
        return [item for v in tree for item in _items(v)]
    return []
