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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from transformers import PreTrainedModel

from fedtune.core.atomic import staged_dir
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.edge.genai_build import build_decoder, save_for_builder
from fedtune.edge.parity import (
    Classifier,
    calibration_feeds,
    check_rows,
    max_abs_diff,
    ort_outputs,
    quality_gate,
    torch_outputs,
)
from fedtune.edge.quantize import int8_classifier, method, quantize_model
from fedtune.edge.runtime import GENAI_CONFIG, MANIFEST, sha256_file
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.checkpoint import load_run_model
from fedtune.engine.data import ExampleSet, TaskSpec, encode

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
    """Write RUN's model (global, or CLIENT's personalised one) as a checked ONNX bundle in OUT."""
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
    rows = check_rows(config, check_data, check_examples + CALIBRATION_EXAMPLES)
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
        reference, parity = _export_fp32(merged, adapter, config.model.task, fp32, checks, tolerance, echo)
        final, kept, gate, record = fp32, [], {}, {}
        if quantize != "none":
            final = staging / "model.onnx"
            checker = QualityCheck(merged, checks, reference, config.model.task, max_drop, min_agreement)
            kept, gate, record = _quantize(fp32, final, quantize, checker, calibration, echo)
            if record:
                apart = len(rows) > check_examples
                record["calibration_examples"] = f"{len(calibration)} ({'apart from' if apart else 'the same as'} the check's)"
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


def _export_fp32(
    merged: PreTrainedModel, adapter: AdapterModel, task: str, fp32: Path, checks: ExampleSet, tolerance: float, echo
) -> tuple[list[np.ndarray], float]:
    """Export the merged model to FP32 and refuse it unless onnxruntime matches PyTorch; returns (reference, parity)."""
    if task == "causal-lm":
        staging = fp32.parent.parent
        build_decoder(save_for_builder(merged, adapter.tokenizer, staging / "hf"), fp32.parent, staging)
    else:
        export_classifier(merged, fp32)
    reference = torch_outputs(merged, checks)
    parity = max_abs_diff(reference, ort_outputs(fp32, checks, merged))
    echo(f"parity fp32: max |onnxruntime - pytorch| = {parity:.2e} on {len(checks)} examples (tolerance {tolerance:g})")
    if not parity <= tolerance:
        raise UserError(f"export refused: fp32 ONNX differs from PyTorch by {parity:.2e} > tolerance {tolerance:g}")
    return reference, parity


@dataclass(frozen=True)
class QualityCheck:
    """Whether a quantized model still answers like the fp32 one on the check examples."""

    model: PreTrainedModel
    checks: ExampleSet
    reference: list[np.ndarray]
    task: str
    max_drop: float
    min_agreement: float

    def __call__(self, path: Path) -> tuple[bool, dict]:
        outputs = ort_outputs(path, self.checks, self.model)
        gate = quality_gate(self.task, self.reference, outputs, self.checks)
        gate["quantized_max_abs_diff"] = max_abs_diff(self.reference, outputs)
        drop_ok = gate.get("accuracy_drop_points", 0.0) <= self.max_drop
        return drop_ok and gate.get("next_token_agreement", 1.0) >= self.min_agreement, gate

    def limit(self) -> str:
        return f"max drop {self.max_drop} points" if self.task == "classification" else f"min agreement {self.min_agreement}"


def _quantize(
    fp32: Path, final: Path, quantize: str, check: QualityCheck, calibration: ExampleSet, echo
) -> tuple[list[str], dict, dict]:
    """Quantize FP32 into FINAL or refuse; returns (nodes kept in float, quality gate, int8 search record)."""
    record: dict = {}
    if quantize == "int8" and check.task == "classification":
        echo("int8: trying dynamic, static, static per-channel, then sensitive MatMuls in float until the check holds")
        record = int8_classifier(fp32, final, calibration_feeds(calibration), check, _large(fp32))
        for tried in record["attempts"]:
            echo(f"int8 {tried['scheme']}: {json.dumps({k: v for k, v in tried.items() if k != 'scheme'})}")
        passed, kept = record["passed"], record["kept_full_precision"]
        gate = {k: v for k, v in record["attempts"][-1].items() if k not in ("scheme", "passed")}
    else:
        kept = quantize_model(fp32, final, quantize, check.task, _large(fp32))
        passed, gate = check(final)
        echo(f"{quantize} check: {json.dumps(gate)}")
    if not passed:
        raise UserError(f"export refused: {quantize} quality check failed ({json.dumps(gate)}; {check.limit()})")
    return kept, gate, record


def export_classifier(model: PreTrainedModel, path: Path) -> None:
    # The example batch must contain padding: with an all-ones mask, transformers skips the
    # masking path in Python and the traced graph would ignore attention_mask.
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    torch.onnx.export(
        Classifier(model).eval(),  # the exporter restores the wrapper's mode on the model
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
