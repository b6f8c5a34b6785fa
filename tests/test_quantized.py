"""A quantized frozen base (bitsandbytes) under the LoRA adapter, and compressed traffic."""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from conftest import run_cli, write_support_check
from fedtune.cli.resolve import resolve
from fedtune.core.config import load_config
from fedtune.engine.adapters import build_adapter_model

pytestmark = pytest.mark.slow


def _config(quantization: str):
    config = load_config("simulations/configs/quickstart.yaml", [f"model.quantization={quantization}"])
    return resolve(config, name_hint="q", need_train_data=True)


@pytest.mark.parametrize("quantization, layer_type", [("nf4", Linear4bit), ("int8", Linear8bitLt)])
def test_quantized_base_trains_the_adapter_in_full_precision(quantization, layer_type):
    model = build_adapter_model(_config(quantization), ["complaint", "praise", "question"])
    query = model.model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer, layer_type)
    assert all(p.dtype == torch.float32 for p in model.params.values())
    batch = model.tokenizer(["where is my parcel", "thanks a lot"], return_tensors="pt", padding=True)
    labels = torch.tensor([0, 1])
    params = model.trainable(["lora_A", "lora_B", "head"])
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.params.items()}
    for _ in range(2):  # train, evaluate, train: bitsandbytes' CPU inference repacking must not break training
        model.model.train()
        model.model(**batch, labels=labels).loss.backward()
        assert all(p.grad is not None for p in params.values())
        assert all(p.grad.abs().sum() > 0 for n, p in model.params.items() if ".lora_A." not in n)  # B = 0 at first
        optimizer.step()
        optimizer.zero_grad()
        model.model.eval()
        with torch.no_grad():
            model.model(**batch)
    changed = [n for n, p in model.params.items() if not torch.equal(p, before[n])]
    assert len(changed) == len(model.params)


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quantized") / "run"
    args = ["simulate", "simulations/configs/quickstart.yaml", "--out", str(run)]
    for setting in (
        "model.quantization=nf4",
        "federation.compression=int8",
        "federation.clients=3",
        "data.partition.kind=iid",
        "federation.rounds=2",
        "client.local_steps=3",
        "data.eval_max_examples=120",
    ):
        args += ["--set", setting]
    result = run_cli(*args, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def test_nf4_run_with_int8_traffic_completes_and_counts_compressed_bytes(quantized_run):
    records = [json.loads(line) for line in (quantized_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    summary = json.loads((quantized_run / "summary.json").read_text())
    assert summary["status"] == "completed" and 0 <= summary["final"]["eval_accuracy"] <= 1
    adapter_values = sum(t.numel() for t in build_adapter_model(_config("none"), ["a", "b", "c"]).params.values())
    for record in records:
        per_client = record["bytes_up"] / record["clients"]
        assert adapter_values * 1.0 < per_client < adapter_values * 1.1  # int8: ~1.03 bytes per value
    assert (quantized_run / "checkpoints" / "round-2" / "adapter_model.safetensors").is_file()


def test_quantized_run_evaluates_on_either_base_and_exports_onto_full_precision(quantized_run, tmp_path):
    data = tmp_path / "check.jsonl"
    write_support_check(data)
    as_trained = run_cli("evaluate", str(quantized_run), "--data", str(data), timeout=300)
    full = run_cli("evaluate", str(quantized_run), "--data", str(data), "--quantization", "none", timeout=300)
    assert as_trained.returncode == 0 and full.returncode == 0, as_trained.stderr + full.stderr
    assert json.loads(as_trained.stdout)["base_quantization"] == "nf4"
    assert json.loads(full.stdout)["base_quantization"] == "none"

    bundle = tmp_path / "bundle"
    export = run_cli("export", str(quantized_run), "--out", str(bundle), "--check-data", str(data), timeout=600)
    assert export.returncode == 0, export.stdout + export.stderr
    assert "trained on a nf4 base" in export.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["trained_base_quantization"] == "nf4"
    assert manifest["parity"]["fp32_max_abs_diff"] <= manifest["parity"]["tolerance"]
