"""Edge export and runtime: parity with PyTorch, quantization gate, torch-free runtime, bad bundles."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from fedtune.cli.resolve import resolve
from fedtune.core.config import Config
from fedtune.core.rundir import RunDir
from fedtune.edge import Bundle, EdgeError
from fedtune.edge.export import export_bundle
from fedtune.edge.runtime import sha256_file
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.checkpoint import load_run_model, save_checkpoint

pytestmark = pytest.mark.slow

CLASS_NAMES = {"complaint": "unhappy customer", "praise": "happy customer", "question": "needs an answer"}
TEXTS = ["Hi, how do I reset the router?", "The nurse was wonderful, thanks!", "My parcel never arrived, terrible"]


def make_run(tmp_path, raw: dict, scale: float = 0.05, residual: bool = False) -> RunDir:
    """A run directory whose round-1 checkpoint holds a non-trivial (random) adapter, and with RESIDUAL
    a random base residual per LoRA layer (what FLoRA and FedEx-LoRA fold into the base)."""
    config = resolve(Config.model_validate(raw), name_hint="edge", need_train_data=False)
    run = RunDir.create(tmp_path / "run", config)
    model = build_adapter_model(config, list(config.data.labels or []))
    generator = torch.Generator().manual_seed(1)
    state = {n: v + scale * torch.randn(v.shape, generator=generator) for n, v in model.state().items()}
    if residual:
        state |= {n: scale * torch.randn(w.shape, generator=generator) for n, w in model.residual_layers().items()}
    save_checkpoint(run, 1, model, state, {"strategy": {}})
    return run


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    run = make_run(
        tmp,
        {
            "model": {"name": "minilm-l6", "max_length": 48},
            "data": {
                "eval": "synthetic:support/eval",
                "labels": ["complaint", "praise", "question"],
                "label_words": CLASS_NAMES,
            },
        },
    )
    said: list[str] = []
    manifest = export_bundle(run, tmp / "bundle", check_examples=64, echo=said.append)
    return run, tmp / "bundle", manifest, said


def test_classifier_bundle_matches_pytorch(classifier_bundle):
    run, path, manifest, said = classifier_bundle
    assert manifest["parity"]["fp32_max_abs_diff"] < 1e-4 and manifest["parity"]["examples"] == 64
    assert set(manifest["sha256"]) == {"model.onnx"} and manifest["labels"] == ["complaint", "praise", "question"]
    bundle = Bundle.load(path)
    model, _ = load_run_model(run)
    inputs = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.model(**inputs).logits.numpy()
    assert np.abs(bundle.logits(TEXTS) - expected).max() < 1e-4  # tokenizers-only encoding == transformers'
    predictions = bundle.classify(TEXTS)
    assert [p.label for p in predictions] == [model.labels[i] for i in expected.argmax(-1)]
    assert [p.name for p in predictions] == [CLASS_NAMES[p.label] for p in predictions]
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-5 for p in predictions)
    phases = ("loading run's model", "exporting minilm-l6 (classification) round 1", "parity fp32:", "bundle:")
    assert all(any(phase in line for line in said) for phase in phases), said  # issue 16: phase lines
    # the run has a checkpoint but no summary.json: the export says what it exported
    assert any("has no summary.json: the run is still going or was stopped; exporting its checkpoint of round 1"
               in line for line in said), said
    printed = json.loads(run_cli("edge", "run", str(path), "--text", TEXTS[0], timeout=120).stdout)
    assert (printed["label"], printed["name"]) == (predictions[0].label, predictions[0].name)


def test_edge_runtime_runs_with_torch_unimportable(classifier_bundle):
    _, path, _, _ = classifier_bundle
    blocker = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'peft', 'flwr'):\n"
        "    sys.modules[name] = None  # any import of these now fails\n"
        "from fedtune.cli import main\n"
        f"code = main(['edge', 'run', {str(path)!r}, '--text', 'How do I change my seat?'])\n"
        "assert not any(m in sys.modules and sys.modules[m] is not None for m in ('torch', 'transformers'))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["label"] in {"complaint", "praise", "question"} and len(output["probabilities"]) == 3


def test_bad_bundles_are_one_clear_line(classifier_bundle, tmp_path):
    _, path, _, _ = classifier_bundle
    result = run_cli("edge", "run", str(tmp_path / "nowhere"), "--text", "x", timeout=120)
    assert result.returncode == 2 and "not a fedtune bundle" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    (broken / "model.onnx").write_bytes(bytes(data))
    result = run_cli("edge", "run", str(broken), "--text", "x", timeout=120)
    assert result.returncode == 2 and "checksum mismatch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    (broken / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EdgeError, match="cannot load the bundle"):
        Bundle.load(broken, verify=False)


def test_quantized_bundles_are_smaller_and_checked(classifier_bundle, tmp_path):
    run, path, fp32, _ = classifier_bundle
    int8 = export_bundle(run, tmp_path / "int8", quantize="int8", check_examples=64, echo=lambda *_: None)
    assert int8["sizes"]["model_bytes"] <= 0.3 * fp32["sizes"]["model_bytes"]
    assert int8["quality_check"]["accuracy_drop_points"] <= 1.0 and int8["quantization"]["mode"] == "int8"
    scheme = int8["quantization"]["scheme"]  # the first int8 scheme that passed, after those that did not
    assert [a["scheme"] for a in int8["quantization"]["attempts"]][-1] == scheme
    assert int8["quantization"]["attempts"][-1]["passed"] and "calibration_examples" in int8["quantization"]
    assert Bundle.load(tmp_path / "int8").classify(TEXTS)
    # a gate that nothing can pass refuses to write the bundle
    from fedtune.core.errors import UserError

    with pytest.raises(UserError, match="quality check failed"):
        export_bundle(
            run, tmp_path / "never", quantize="int4", check_examples=64, max_drop=-100.0, echo=lambda *_: None
        )
    assert not (tmp_path / "never").exists()


def test_causal_lm_bundle_generates_like_pytorch(tmp_path):
    run = make_run(
        tmp_path,
        {
            "model": {"name": "smollm2-135m", "task": "causal-lm", "max_length": 48},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"eval": "synthetic:support/eval", "prompt": "Message: {text}\nIntent:", "response": " {label}"},
        },
        scale=0.02,
    )
    manifest = export_bundle(run, tmp_path / "lm", check_examples=8, echo=lambda *_: None)
    assert manifest["parity"]["fp32_max_abs_diff"] < 1e-3
    # large: external weights; the generator's config names the model file, so it is checksummed too
    assert set(manifest["sha256"]) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert manifest["generator"].startswith("onnxruntime-genai ")
    bundle = Bundle.load(tmp_path / "lm")
    model, _ = load_run_model(run)
    merged = model.model.merge_and_unload().eval()
    prompts = [
        "The capital of France is",
        "Once upon a time",
        "def add(a, b):",
        "My favourite food is",
        "Hello, my name",
    ]
    for prompt in prompts:
        ids = model.tokenizer(prompt)["input_ids"]
        assert bundle.tokenizer.encode(prompt).ids == ids
        with torch.no_grad():
            reference = merged.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
            )[0, len(ids) :].tolist()
        if model.tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(model.tokenizer.eos_token_id)]
        assert bundle.generate_ids(ids, max_new_tokens=32) == reference, prompt
    sampled = [bundle.generate_ids(ids, 16, temperature=1.0, top_k=k, seed=s) for k in (0, 40) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[3] == sampled[4]  # a seed repeats its sample
    assert sampled[0] != sampled[2] or sampled[3] != sampled[5]

    without_torch = (  # the device side: generation without torch or transformers
        "import sys\n"
        "for name in ('torch', 'transformers', 'peft', 'flwr'):\n"
        "    sys.modules[name] = None\n"
        "from fedtune.cli import main\n"
        f"sys.exit(main(['edge', 'run', {str(tmp_path / 'lm')!r}, '--raw', '--text', 'Once upon a time',"
        " '--max-new-tokens', '8']))\n"
    )
    result = subprocess.run([sys.executable, "-c", without_torch], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generated"] == bundle.generate("Once upon a time", max_new_tokens=8) != ""

    with pytest.raises(EdgeError, match="exceeds the model's context of 8192"):
        bundle.generate_ids(ids, max_new_tokens=9000)

    config = tmp_path / "lm" / "genai_config.json"
    original = config.read_text()
    config.write_text(original.replace('"model.onnx"', '"../elsewhere.onnx"'))
    with pytest.raises(EdgeError, match="genai_config.json: checksum mismatch"):
        Bundle.load(tmp_path / "lm")
    # even with a matching checksum (manifest.json is not signed), the config may not load code
    described = json.loads(original)
    described["model"]["decoder"]["session_options"]["custom_ops_library"] = "/tmp/evil.so"
    config.write_text(json.dumps(described))
    manifest_file = tmp_path / "lm" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["sha256"]["genai_config.json"] = sha256_file(config)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(EdgeError, match="custom_ops_library = '/tmp/evil.so' is not allowed"):
        Bundle.load(tmp_path / "lm")
    # issue 31, finding 11: session options of any model part, not only the decoder's
    described = json.loads(original)
    described["model"]["embedding"] = {"filename": "model.onnx", "session_options": {"enable_profiling": "x"}}
    config.write_text(json.dumps(described))
    manifest["sha256"]["genai_config.json"] = sha256_file(config)
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(EdgeError, match=r"session options \['enable_profiling'\] are not allowed"):
        Bundle.load(tmp_path / "lm")


def test_fedsa_personalised_bundle_matches_pytorch_on_that_clients_data(tmp_path):
    from fedtune.engine.partition import client_rows

    run = tmp_path / "fedsa"
    result = run_cli(
        "simulate",
        "simulations/configs/quickstart.yaml",
        "--out",
        str(run),
        "--set",
        "strategy.name=fedsa",
        "--set",
        "federation.rounds=2",
        "--set",
        "client.local_steps=4",
        "--set",
        "data.eval_max_examples=60",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    config = RunDir.open(run).config()
    held_out = client_rows(config, 1)[1]
    data = tmp_path / "client-1.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in held_out))

    export = run_cli("export", str(run), "--client", "client-1", "--out", str(tmp_path / "bundle"), timeout=600)
    assert export.returncode == 0, export.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["client"] == "client-1" and manifest["source"]["strategy"] == "fedsa"

    edge = json.loads(run_cli("edge", "bench", str(tmp_path / "bundle"), "--data", str(data), timeout=300).stdout)
    torch_eval = json.loads(
        run_cli("evaluate", str(run), "--client", "client-1", "--data", str(data), timeout=300).stdout
    )
    global_eval = json.loads(run_cli("evaluate", str(run), "--data", str(data), timeout=300).stdout)
    assert edge["examples"] == torch_eval["num_examples"] == len(held_out)
    assert edge["accuracy"] == pytest.approx(torch_eval["eval_accuracy"], abs=1e-9)
    assert edge["latency_ms_p50"] > 0 and edge["latency_ms_p95"] >= edge["latency_ms_p50"]
    # the personalised model is not the global one (FedSA's global B is zero)
    assert torch_eval["eval_loss"] != pytest.approx(global_eval["eval_loss"])

    # one base, one adapter per client: each client's predictions are its personalised model's
    older = run_cli("export", str(run), "--clients", "all", "--round", "1", "--out", str(tmp_path / "old"), timeout=120)
    assert older.returncode == 2 and "clients keep their private tensors of the last round only (2)" in older.stderr

    multi = tmp_path / "every-client"
    export = run_cli("export", str(run), "--clients", "all", "--out", str(multi), "--check-examples", "60", timeout=600)
    assert export.returncode == 0, export.stderr
    bench_1 = json.loads(run_cli("edge", "bench", str(multi), "--client", "client-1", "--data", str(data), timeout=300).stdout)
    assert bench_1["accuracy"] == pytest.approx(torch_eval["eval_accuracy"], abs=1e-9)
    bundle = Bundle.load(multi)
    assert bundle.clients == ["global", *(f"client-{k}" for k in range(5))]
    for name in bundle.clients:
        model, _ = load_run_model(RunDir.open(run), client=None if name == "global" else name, quantization="none")
        ids = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model.model(**ids).logits.numpy()
        np.testing.assert_allclose(bundle.with_client(name).logits(TEXTS), expected, atol=1e-4)
    sizes = json.loads((multi / "manifest.json").read_text())["sizes"]["files"]
    single = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["sizes"]["files"]["model.onnx"]
    adapters = {k: v for k, v in sizes.items() if k.startswith("adapters/")}
    assert sizes["model.onnx"] <= 1.01 * single  # the base once (unmerged LoRA adds its few tensors' ops only)
    assert len(adapters) == 7 and sum(adapters.values()) < 0.05 * single  # shared.npz + 6 adapters, small
    with pytest.raises(EdgeError, match="client 'client-9': not in"):
        bundle.with_client("client-9")
    fresh = Bundle.load(multi)  # checks every file now; client-2's arrays are read on first use
    checked = bundle.with_client("client-2").logits(TEXTS)
    tampered = multi / "adapters" / "client-2.npz"
    tampered.write_bytes(tampered.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(EdgeError, match="client-2.npz: checksum mismatch"):
        fresh.with_client("client-2")  # read after the change: checked when read
    # a bundle that read client-2 before keeps the arrays it checked
    np.testing.assert_array_equal(bundle.with_client("client-2").logits(TEXTS), checked)


def test_bundle_api_and_bench_treat_a_user_kindly(classifier_bundle, tmp_path):
    """Issue 16: one string is one text, print(bundle) is one line, a file without the text column is one line."""
    run, path, manifest, _ = classifier_bundle
    bundle = Bundle.load(path)
    assert len(bundle.classify("How do I change my seat?")) == 1
    with pytest.raises(EdgeError, match="one model for everyone"):
        bundle.with_client("client-0")
    refused = run_cli("export", str(run.path), "--clients", "all", "--out", str(tmp_path / "every"), timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"fedtune: error: --clients: {run.path} has no per-client tensors (strategy fedit); export the global model without --clients"
    ]
    assert repr(bundle) == f"Bundle({str(path)!r}, task='classification', quantization='none')"
    assert manifest["quantization"]["method"] == "none (fp32)"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"message": "where is my parcel", "label": "question"}\n')
    result = run_cli("edge", "bench", str(path), "--data", str(rows), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "fedtune: error: no column 'text' in the data (columns: message, label); pass --text-field/--label-field"
    ]


def test_lm_adapter_bundle_generates_each_clients_personalised_model(tmp_path):
    from safetensors.torch import save_file

    from fedtune.engine.checkpoint import PRIVATE_FILE

    run = make_run(
        tmp_path,
        {
            "model": {"name": "smollm2-135m", "task": "causal-lm", "max_length": 48},
            "strategy": {"name": "fedsa"},
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"eval": "synthetic:support/eval", "prompt": "Message: {text}\nIntent:", "response": " {label}"},
        },
        scale=0.05,
    )
    model, _ = load_run_model(run)
    generator = torch.Generator().manual_seed(2)
    for client in ("acme", "globex"):  # FedSA: each client's own B
        private = {n: 0.3 * torch.randn(v.shape, generator=generator) for n, v in model.state().items() if "lora_B" in n}
        run.client_dir(client).mkdir(parents=True)
        save_file(private, str(run.client_dir(client) / PRIVATE_FILE))
    out = tmp_path / "every-client"
    result = run_cli("export", str(run.path), "--clients", "all", "--out", str(out), "--check-examples", "4", timeout=900)
    assert result.returncode == 0, result.stderr
    bundle = Bundle.load(out)
    assert bundle.clients == ["global", "acme", "globex"] and bundle.client == "global"
    prompts = ["Message: my parcel never came\nIntent:", "Once upon a time"]
    generated = {}
    for name in bundle.clients:
        personal, _ = load_run_model(run, client=None if name == "global" else name, quantization="none")
        merged = personal.model.merge_and_unload().eval()
        for prompt in prompts:
            ids = personal.tokenizer(prompt)["input_ids"]
            eos = personal.tokenizer.eos_token_id
            with torch.no_grad():
                reference = merged.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=eos)
            reference = reference[0, len(ids) :].tolist()
            reference = reference[: reference.index(eos)] if eos in reference else reference
            generated[name, prompt] = bundle.with_client(name).generate_ids(ids, max_new_tokens=12)
            assert generated[name, prompt] == reference, (name, prompt)
    assert any(generated["acme", p] != generated["globex", p] for p in prompts)  # the adapters matter

    sizes = json.loads((out / "manifest.json").read_text())["sizes"]["files"]
    base = sizes["model.onnx"] + sizes["model.onnx.data"]
    adapters = {k: v for k, v in sizes.items() if k.startswith("adapters/")}
    assert sorted(adapters) == [f"adapters/{c}.onnx_adapter" for c in ("acme", "global", "globex")]
    assert sum(adapters.values()) < 0.02 * base  # a bundle is the base once plus small adapters

    fresh = Bundle.load(out)  # checks every file now; globex's adapter is read on first use
    tampered = out / "adapters" / "globex.onnx_adapter"
    tampered.write_bytes(tampered.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(EdgeError, match="globex.onnx_adapter: checksum mismatch"):
        fresh.with_client("globex")
