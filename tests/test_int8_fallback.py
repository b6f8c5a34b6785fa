"""int8 that keeps its accuracy: the fallback through static, per-channel and float MatMuls.

A real MiniLM classifier (a ridge-regression head on its pooled features, 87.5% on the
synthetic support task) is given hidden-state outliers that leave its fp32 function
unchanged (in every layer, value channel 5 × K and the attention output's matching input
column ÷ K), the way trained transformers grow outlier features. Per-tensor int8 of the
activations then flattens every other channel of those MatMuls' inputs: dynamic, static
and per-channel int8 all miss the gate. The fallback must find those six MatMuls (the
per-channel noise ranking) and keep them in float until the gate holds.
"""

from __future__ import annotations

import pytest
import torch

from fedtune.core.config import Config
from fedtune.core.records import read_records
from fedtune.edge.export import QualityCheck, export_classifier
from fedtune.edge.parity import calibration_feeds, torch_outputs
from fedtune.edge.quantize import int8_classifier
from fedtune.engine.base_model import load_base_model, load_tokenizer
from fedtune.engine.data import ExampleSet, TaskSpec, encode

pytestmark = pytest.mark.slow

OUTLIER = 30000.0


def _model_with_outlier(training: ExampleSet):
    """MiniLM with a least-squares head on its pooled features (a real classifier), then the outlier."""
    model = load_base_model("minilm-l6", "classification", 3, torch.device("cpu")).eval()
    with torch.no_grad():
        features, targets = [], []
        for _, batch in training.eval_batches(32):
            features.append(model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output)
            targets.append(torch.nn.functional.one_hot(batch["labels"], 3).float())
        x = torch.cat([torch.cat(features), torch.ones(len(training), 1)], dim=1)
        ridge = 1.0 * torch.eye(x.shape[1])  # ridge regression: small weights, no noise amplification
        solution = torch.linalg.solve(x.T @ x + ridge, x.T @ (torch.cat(targets) * 10.0))
        model.classifier.weight.copy_(solution[:-1].T)
        model.classifier.bias.copy_(solution[-1])
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight[5] *= OUTLIER
            layer.attention.self.value.bias[5] *= OUTLIER
            layer.attention.output.dense.weight[:, 5] /= OUTLIER
    return model


def _examples(start: int, count: int) -> ExampleSet:
    config = Config.model_validate({"model": {"task": "classification"}, "data": {"labels": ["complaint", "praise", "question"]}})
    rows = list(read_records("synthetic:support/eval"))[start : start + count]
    return encode(rows, TaskSpec.from_config(config), load_tokenizer("minilm-l6"), "check")


def test_the_fallback_keeps_the_outlier_matmul_in_float_until_the_gate_holds(tmp_path):
    checks, calibration = _examples(0, 200), _examples(200, 64)
    model = _model_with_outlier(_examples(264, 300))
    fp32 = tmp_path / "fp32.onnx"
    export_classifier(model, fp32)
    check = QualityCheck(model, checks, torch_outputs(model, checks), "classification", max_drop=1.0, min_agreement=1.0)
    record = int8_classifier(fp32, tmp_path / "int8.onnx", calibration_feeds(calibration), check, False)
    first = record["attempts"][:3]
    assert [a["scheme"] for a in first] == ["dynamic", "static", "static-per-channel"]
    assert all(a["accuracy_drop_points"] > 10 for a in first)  # the plain schemes miss the gate by far
    assert record["passed"] and record["attempts"][-1]["accuracy_drop_points"] <= 1.0
    kept = record["kept_full_precision"]
    outliers = [f"/model/bert/encoder/layer.{i}/attention/output/dense/MatMul" for i in range(6)]
    assert set(outliers) <= set(kept) and len(kept) <= 8  # found them, and not much more
    assert set(record["why_kept"]) == set(kept)
    assert (tmp_path / "int8.onnx").stat().st_size <= 0.35 * fp32.stat().st_size
