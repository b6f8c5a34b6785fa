"""``fedtune export``: a run's adapter merged into its base model, as a verified ONNX bundle.

Steps: load the checkpoint (global, or a FedSA client's personalised adapter) on the
full-precision base, ``merge_and_unload``, export (classifier: ``torch.onnx.export`` of the
logits; causal LM: onnxruntime-genai's model builder, edge/genai_build.py, whose generator
runs the bundle on the device), compare onnxruntime with PyTorch on
real inputs and refuse a bundle whose largest logit difference exceeds the tolerance,
optionally quantize (edge/quantize.py) and refuse if held-out accuracy (classifier) or
next-token agreement (LM) drops beyond the allowed margin, then write the bundle.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from fedtune.atomic import staged_dir
from fedtune.config import Config
from fedtune.edge.genai_build import build_decoder, save_for_builder
from fedtune.edge.quantize import int8_classifier, method, quantize_model
from fedtune.edge.runtime import GENAI_CONFIG, MANIFEST, sha256_file
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.checkpoint import load_run_model
from fedtune.engine.data import ExampleSet, TaskSpec, encode
from fedtune.engine.partition import server_eval_rows
from fedtune.errors import UserError
from fedtune.records import read_records
from fedtune.rundir import RunDir

OPSET = 17
EXTERNAL_DATA_ABOVE = 512 * 1024**2  # bytes; larger models keep weights in model.onnx.data
CALIBRATION_EXAMPLES = 128  # static int8's activation ranges come from this many examples after the check's


def export_bundle(
    run: RunDir,
    out: Path,
    round_number: int | None = None,
    client: str | None = None,
    quantize: str = "none",
    check_data: str | None = None,
    check_examples: int = 500,
    tolerance: float = 1e-3,
    max_drop: float = 1.0,
    min_agreement: float = 0.9,
    echo=print,
) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    config = run.config()
    if config.model.quantization != "none":  # bitsandbytes layers have no ONNX export
        echo(
            f"the adapter was trained on a {config.model.quantization} base; merging it into the "
            "full-precision base (fedtune evaluate --quantization none measures what that changes)"
        )
    echo(f"loading {run.path.name}'s model ({config.model.name})")
    adapter, used_round = load_run_model(run, round_number, client, quantization="none")
    if not run.summary_file.exists():
        echo(
            f"{run.path} has no summary.json: the run is still going or was stopped; exporting its checkpoint "
            f"of round {used_round} (of {config.federation.rounds} planned)"
        )
    spec = TaskSpec.from_config(config)
    rows = _check_rows(config, check_data, check_examples + CALIBRATION_EXAMPLES)
    checks = encode(rows[:check_examples], spec, adapter.tokenizer, "check data")
    # static int8 calibrates on examples the check does not score (the check's own when there are no others)
    calibration = encode(rows[check_examples:] or rows[:check_examples], spec, adapter.tokenizer, "calibration data")
    merged = adapter.model.merge_and_unload().eval()
    staging = out.with_name(f".{out.name}.work")  # intermediate ONNX files; the bundle is staged by staged_dir
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "fp32").mkdir(parents=True)
    try:
        fp32 = staging / "fp32" / "model.onnx"
        echo(
            f"exporting {config.model.name} ({config.model.task}) round {used_round}"
            + (f", client {client}" if client else "")
        )
        if config.model.task == "causal-lm":
            build_decoder(save_for_builder(merged, adapter.tokenizer, staging / "hf"), fp32.parent, staging)
        else:
            _export_classifier(merged, fp32)
        reference = _torch_outputs(merged, checks)
        parity = _max_abs_diff(reference, _ort_outputs(fp32, checks, merged))
        echo(f"parity fp32: max |onnxruntime - pytorch| = {parity:.2e} on {len(checks)} examples (tolerance {tolerance:g})")
        if not parity <= tolerance:
            raise UserError(f"export refused: fp32 ONNX differs from PyTorch by {parity:.2e} > tolerance {tolerance:g}")

        final, kept, gate, record = fp32, [], {}, {}
        if quantize != "none":
            final = staging / "model.onnx"

            def check(path: Path) -> tuple[bool, dict]:
                outputs = _ort_outputs(path, checks, merged)
                gate = _quality_gate(config.model.task, reference, outputs, checks)
                gate["quantized_max_abs_diff"] = _max_abs_diff(reference, outputs)
                drop_ok = gate.get("accuracy_drop_points", 0.0) <= max_drop
                return drop_ok and gate.get("next_token_agreement", 1.0) >= min_agreement, gate

            if quantize == "int8" and config.model.task == "classification":
                echo("int8: trying dynamic, static, static per-channel, then sensitive MatMuls in float until the check holds")
                record = int8_classifier(fp32, final, _calibration_feeds(calibration), check, _large(fp32))
                apart = len(rows) > check_examples
                record["calibration_examples"] = f"{len(calibration)} ({'apart from' if apart else 'the same as'} the check's)"
                for tried in record["attempts"]:
                    echo(f"int8 {tried['scheme']}: {json.dumps({k: v for k, v in tried.items() if k != 'scheme'})}")
                passed, kept = record["passed"], record["kept_full_precision"]
                gate = {k: v for k, v in record["attempts"][-1].items() if k not in ("scheme", "passed")}
            else:
                kept = quantize_model(fp32, final, quantize, config.model.task, _large(fp32))
                passed, gate = check(final)
                echo(f"{quantize} check: {json.dumps(gate)}")
            if not passed:
                limit = (
                    f"max drop {max_drop} points"
                    if config.model.task == "classification"
                    else f"min agreement {min_agreement}"
                )
                raise UserError(f"export refused: {quantize} quality check failed ({json.dumps(gate)}; {limit})")
        with staged_dir(out) as bundle:
            _save_model(final, bundle / "model.onnx")
            adapter.tokenizer.save_pretrained(bundle)
            generator = [GENAI_CONFIG] if config.model.task == "causal-lm" else []
            for name in generator:
                shutil.copyfile(fp32.parent / name, bundle / name)
            manifest = manifest_record(
                bundle,
                config,
                adapter,
                source={"run": str(run.path.resolve()), "round": used_round, "client": client},
                quantization={
                    "mode": quantize,
                    "kept_full_precision": kept,
                    "method": method(quantize, config.model.task),
                    **{k: record[k] for k in ("scheme", "attempts", "why_kept", "calibration_examples") if k in record},
                },
                parity={"fp32_max_abs_diff": parity, "tolerance": tolerance, "examples": len(checks)},
                gate=gate,
                extra_files=generator,
            )
            (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:  # intermediate files, also when the export is refused or fails
        shutil.rmtree(staging, ignore_errors=True)
    echo(f"bundle: {out} ({manifest['sizes']['model_bytes'] / 1e6:.1f} MB model)")
    return manifest


class _Classifier(torch.nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _cache_shape(model: PreTrainedModel) -> dict[str, int]:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads, "head_dim": head_dim}


def _export_classifier(model: PreTrainedModel, path: Path) -> None:
    # The example batch must contain padding: with an all-ones mask, transformers skips the
    # masking path in Python and the traced graph would ignore attention_mask.
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.onnx.export(
        _Classifier(model).eval(),  # the exporter restores the wrapper's mode on the model
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "logits": {0: "batch"},
        },
        opset_version=OPSET,
        dynamo=False,
    )


def _calibration_feeds(examples: ExampleSet) -> list[dict[str, np.ndarray]]:
    return [{k: v for k, v in feed.items() if k != "labels"} for feed in _inputs(examples)]


def _inputs(checks: ExampleSet) -> list[dict[str, np.ndarray]]:
    """Right-padded batches of the check examples (what both runtimes see)."""
    feeds = []
    for _, batch in checks.eval_batches(16):
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        if "labels" in batch:
            feed["labels"] = batch["labels"].numpy()
        feeds.append(feed)
    return feeds


@torch.no_grad()
def _torch_outputs(model: PreTrainedModel, checks: ExampleSet) -> list[np.ndarray]:
    outputs = []
    for feed in _inputs(checks):
        ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        outputs.append(model(input_ids=ids, attention_mask=mask).logits.float().numpy())
    return outputs


def _ort_outputs(
    path: Path, checks: ExampleSet, model: PreTrainedModel, adapter: dict[str, np.ndarray] | None = None
) -> list[np.ndarray]:
    """onnxruntime's logits for the check examples (ADAPTER: extra inputs of an adapter bundle)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    outputs = []
    for feed in _inputs(checks):
        inputs = {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"], **(adapter or {})}
        past = [n for n in names if n.startswith("past_key_values.")]  # a decoder: run it without a cache
        if past:
            shape = _cache_shape(model)
            empty = np.zeros((len(feed["input_ids"]), shape["kv_heads"], 0, shape["head_dim"]), np.float32)
            inputs |= dict.fromkeys(past, empty)
        outputs.append(session.run(["logits"], inputs)[0])
    return outputs


def _max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def _quality_gate(task: str, reference: list[np.ndarray], quantized: list[np.ndarray], checks: ExampleSet) -> dict:
    feeds = _inputs(checks)
    if task == "classification":
        truth = np.concatenate([f["labels"] for f in feeds])
        before = (np.concatenate([r.argmax(-1) for r in reference]) == truth).mean()
        after = (np.concatenate([q.argmax(-1) for q in quantized]) == truth).mean()
        return {
            "accuracy_fp32": round(float(before), 4),
            "accuracy_quantized": round(float(after), 4),
            "accuracy_drop_points": round(float(100 * (before - after)), 2),
            "examples": int(len(truth)),
        }
    agree = total = 0
    nll_ref = nll_q = 0.0
    for ref, quant, feed in zip(reference, quantized, feeds):
        mask = feed["attention_mask"][:, 1:].astype(bool)
        targets = feed["input_ids"][:, 1:]
        agree += int(((ref[:, :-1].argmax(-1) == quant[:, :-1].argmax(-1)) & mask).sum())
        total += int(mask.sum())
        nll_ref += _nll(ref[:, :-1], targets, mask)
        nll_q += _nll(quant[:, :-1], targets, mask)
    return {
        "next_token_agreement": round(agree / total, 4),
        "perplexity_fp32": round(float(np.exp(nll_ref / total)), 3),
        "perplexity_quantized": round(float(np.exp(nll_q / total)), 3),
        "tokens": total,
    }


def _nll(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((logz - picked) * mask).sum())


def _check_rows(config: Config, check_data: str | None, limit: int) -> list[dict]:
    """Labeled rows for the parity and quality checks: --check-data, else the server's eval data,
    else the run's training data."""
    if check_data:
        rows = list(read_records(check_data))
    elif (found := server_eval_rows(config)) and found[0]:
        rows = found[0]
    elif config.data.train:
        rows = list(read_records(config.data.train))
    else:
        raise UserError(
            "no data to verify the export against; pass --check-data FILE (labeled, like the training data)"
        )
    return rows[:limit]


def _large(path: Path) -> bool:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) > EXTERNAL_DATA_ABOVE


def _save_model(source: Path, target: Path) -> None:
    """Copy an ONNX model into the bundle; large ones keep weights in model.onnx.data."""
    model = onnx.load(str(source))
    if _large(source):
        onnx.save(
            model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data"
        )
    else:
        onnx.save(model, str(target))


def manifest_record(
    bundle: Path,
    config: Config,
    adapter: AdapterModel,
    *,
    source: dict,
    quantization: dict,
    parity: dict,
    gate: dict,
    extra_files: list[str] = (),
) -> dict:
    """What a runtime needs to use the bundle (task, labels, tokens, prompt), and how it was made and checked.

    EXTRA_FILES (paths inside the bundle, e.g. per-client adapters) are checksummed like the model."""
    model_files = sorted(p.name for p in bundle.iterdir() if p.name.startswith("model.onnx")) + list(extra_files)
    tokenizer = adapter.tokenizer
    manifest = {
        "format": 1,
        "task": config.model.task,
        "labels": list(adapter.labels),
        "label_words": config.data.label_words or {},
        "max_length": config.model.max_length,
        "fields": {"text": config.data.text_field, "label": config.data.label_field},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "quantization": quantization,
        "parity": parity,
        "quality_check": gate,
        "sizes": {
            "model_bytes": sum((bundle / f).stat().st_size for f in model_files),
            "files": {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}
            | {f: (bundle / f).stat().st_size for f in extra_files},
        },
        "source": {
            **source,
            "model": config.model.name,
            "strategy": config.strategy.name,
            "trained_base_quantization": config.model.quantization,
        },
        "sha256": {name: sha256_file(bundle / name) for name in model_files},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if config.model.task == "causal-lm":
        described = json.loads((bundle / GENAI_CONFIG).read_text())["model"]
        stops = described["eos_token_id"]
        manifest |= {
            "prompt": config.data.prompt,
            "response": config.data.response,
            "vocab_size": described["vocab_size"],
            "context_length": described["context_length"],
            "eos_token_ids": stops if isinstance(stops, list) else [stops],
            "generator": f"onnxruntime-genai {_genai_version()} ({GENAI_CONFIG})",
        }
    else:
        manifest["opset"] = OPSET
    return manifest


def _genai_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")
