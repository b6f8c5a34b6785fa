"""The checks an export makes: the same examples through PyTorch and onnxruntime, compared.

Check rows come from ``--check-data``, else the run's server evaluation data, else its training
data. Outputs are logits on right-padded batches; a quantized model is gated on the accuracy it
loses (classifiers) or on how often its next token agrees with fp32's (causal LMs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import PreTrainedModel

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records
from fedtune.engine.data import ExampleSet
from fedtune.engine.partition import server_eval_rows


class Classifier(torch.nn.Module):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def cache_shape(model: PreTrainedModel) -> dict[str, int]:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "kv_heads": config.num_key_value_heads, "head_dim": head_dim}


def calibration_feeds(examples: ExampleSet) -> list[dict[str, np.ndarray]]:
    return [{k: v for k, v in feed.items() if k != "labels"} for feed in check_feeds(examples)]


def check_feeds(checks: ExampleSet) -> list[dict[str, np.ndarray]]:
    """Right-padded batches of the check examples (what both runtimes see)."""
    feeds = []
    for _, batch in checks.eval_batches(16):
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        if "labels" in batch:
            feed["labels"] = batch["labels"].numpy()
        feeds.append(feed)
    return feeds


@torch.no_grad()
def torch_outputs(model: PreTrainedModel, checks: ExampleSet) -> list[np.ndarray]:
    outputs = []
    for feed in check_feeds(checks):
        ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        outputs.append(model(input_ids=ids, attention_mask=mask).logits.float().numpy())
    return outputs


def ort_outputs(
    path: Path, checks: ExampleSet, model: PreTrainedModel, adapter: dict[str, np.ndarray] | None = None
) -> list[np.ndarray]:
    """onnxruntime's logits for the check examples (ADAPTER: extra inputs of an adapter bundle)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    outputs = []
    for feed in check_feeds(checks):
        run_feed = {"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"], **(adapter or {})}
        past = [n for n in names if n.startswith("past_key_values.")]  # a decoder: run it without a cache
        if past:
            shape = cache_shape(model)
            empty = np.zeros((len(feed["input_ids"]), shape["kv_heads"], 0, shape["head_dim"]), np.float32)
            run_feed |= dict.fromkeys(past, empty)
        outputs.append(session.run(["logits"], run_feed)[0])
    return outputs


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def quality_gate(task: str, reference: list[np.ndarray], quantized: list[np.ndarray], checks: ExampleSet) -> dict:
    feeds = check_feeds(checks)
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
        nll_ref += nll(ref[:, :-1], targets, mask)
        nll_q += nll(quant[:, :-1], targets, mask)
    return {
        "next_token_agreement": round(agree / total, 4),
        "perplexity_fp32": round(float(np.exp(nll_ref / total)), 3),
        "perplexity_quantized": round(float(np.exp(nll_q / total)), 3),
        "tokens": total,
    }


def nll(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((logz - picked) * mask).sum())


def check_rows(config: Config, check_data: str | None, limit: int) -> list[dict]:
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
