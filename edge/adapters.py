"""``fedtune export RUN --clients all``: one base model and one small adapter per client.

A personalised federation (FedSA-LoRA: global A, each client's private B and head) would
otherwise ship N merged models of the base's size each. Here a classifier is exported
*unmerged* (causal LMs: edge/lm_adapters.py), and its adapter tensors (LoRA A and B of every targeted layer, and the head)
are graph inputs instead of weights: the ONNX file holds the frozen base once, and each
client's adapter is a small ``.npz`` fed with every request. Choosing a client is choosing
which arrays to feed; the session, and the base in it, stay loaded.

Tensors that every client holds identically (FedSA's global A, a shared head) are stored
once in ``adapters/shared.npz``; ``adapters/<client>.npz`` holds the rest. ``global`` is the
federation's own model (FedSA: global A, B at its zero init, the shared head). Each client's
ONNX logits are checked against PyTorch's personalised model on the check examples.

What a reader of the bundle learns: the clients' names and their adapter tensors, which is
what a personalised bundle is for; a bundle meant for one client is ``--client NAME``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import load_file

from fedtune.core.atomic import staged_dir
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.edge.export import MANIFEST, OPSET, manifest_record
from fedtune.edge.parity import Classifier, check_rows, max_abs_diff, ort_outputs, torch_outputs
from fedtune.edge.runtime import ADAPTER_DIR, SHARED_ADAPTER
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.checkpoint import PRIVATE_FILE, load_run_model
from fedtune.engine.data import TaskSpec, encode

GLOBAL = "global"


def export_adapter_bundle(
    run: RunDir,
    out: Path,
    clients: list[str] | None = None,
    round_number: int | None = None,
    check_data: str | None = None,
    check_examples: int = 500,
    tolerance: float = 1e-3,
    echo=print,
) -> dict[str, Any]:
    """Write a bundle of a classifier's base model plus one adapter per client of CLIENTS (None: all).

    Causal LMs take edge/lm_adapters.py's bundle (onnxruntime-genai adapters) instead."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    config = run.config()
    adapter, used_round, every = client_adapters(run, clients, round_number, echo)
    names = list(adapter.params)
    shared = [n for n in names if all(torch.equal(t[n], every[GLOBAL][n]) for t in every.values())]
    wanted = [c for c in every if c != GLOBAL]

    spec = TaskSpec.from_config(config)
    checks = encode(check_rows(config, check_data, check_examples), spec, adapter.tokenizer, "check data")
    staging = out.with_name(f".{out.name}.work")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model_file = staging / "model.onnx"
    echo(f"exporting {config.model.name} unmerged, its {len(names)} adapter tensors as inputs, for {len(wanted)} clients")
    _export_with_adapter_inputs(adapter, model_file)
    parity = {}
    for client, tensors in every.items():
        adapter.load_state(tensors)
        feeds = {name: tensors[name].float().numpy() for name in names}
        parity[client] = max_abs_diff(torch_outputs(adapter.model, checks), ort_outputs(model_file, checks, adapter.model, feeds))
        if not parity[client] <= tolerance:
            shutil.rmtree(staging)
            raise UserError(f"export refused: client {client}'s ONNX logits differ from PyTorch by {parity[client]:.2e} > tolerance {tolerance:g}")
    echo(f"parity: max |onnxruntime - pytorch| = {max(parity.values()):.2e} over {len(every)} adapters, {len(checks)} examples each")
    with staged_dir(out) as bundle:
        shutil.copyfile(model_file, bundle / "model.onnx")
        (bundle / ADAPTER_DIR).mkdir()
        np.savez(bundle / ADAPTER_DIR / SHARED_ADAPTER, **{n: every[GLOBAL][n].float().numpy() for n in shared})
        for client, tensors in every.items():
            own = {n: tensors[n].float().numpy() for n in names if n not in shared}
            np.savez(bundle / ADAPTER_DIR / f"{client}.npz", **own)
        adapter.tokenizer.save_pretrained(bundle)
        files = [f"{ADAPTER_DIR}/{SHARED_ADAPTER}", *(f"{ADAPTER_DIR}/{c}.npz" for c in every)]
        manifest = manifest_record(
            bundle,
            config,
            adapter,
            source={"run": str(run.path.resolve()), "round": used_round, "client": None},
            quantization={"mode": "none", "kept_full_precision": [], "method": "none (fp32; adapters unmerged)"},
            parity={"fp32_max_abs_diff": max(parity.values()), "per_client": parity, "tolerance": tolerance, "examples": len(checks)},
            gate={},
            extra_files=files,
        )
        manifest["adapters"] = {"inputs": names, "shared": shared, "clients": list(every), "default": GLOBAL}
        (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(staging)
    sizes = manifest["sizes"]["files"]
    adapters = sum(v for k, v in sizes.items() if k.startswith(ADAPTER_DIR))
    echo(f"bundle: {out} ({sizes['model.onnx'] / 1e6:.1f} MB base, {len(every)} adapters {adapters / 1e6:.2f} MB in all)")
    return manifest


def client_adapters(
    run: RunDir, clients: list[str] | None, round_number: int | None, echo=print
) -> tuple[AdapterModel, int, dict[str, dict[str, torch.Tensor]]]:
    """The run's model and every adapter a bundle holds: ``global`` and each of CLIENTS (None: all
    clients with private state), each as the full adapter state (global tensors + its private ones)."""
    config = run.config()
    known = sorted(p.name for p in (run.path / "clients").glob("*") if (p / PRIVATE_FILE).is_file())
    if not known:
        raise UserError(f"--clients: {run.path} has no per-client tensors (strategy {config.strategy.name}); export the global model without --clients")
    wanted = known if clients is None else clients
    unknown = [c for c in wanted if c not in known]
    if GLOBAL in wanted or "shared" in wanted:
        raise UserError(f"--clients: a client named {GLOBAL!r} or 'shared' would overwrite the bundle's own adapter files")
    if unknown:
        raise UserError(f"--clients: no private state for {unknown} in {run.path} (clients with state: {', '.join(known)})")
    echo(f"loading {run.path.name}'s model ({config.model.name})")
    adapter, used_round = load_run_model(run, round_number, None, quantization="none")
    every = {GLOBAL: adapter.state()}  # the checkpoint's tensors, loaded into the model
    for name in wanted:
        every[name] = {**every[GLOBAL], **load_file(str(run.client_dir(name) / PRIVATE_FILE))}
    return adapter, used_round, every


def _export_with_adapter_inputs(adapter, path: Path) -> None:
    """The unmerged peft classifier as ONNX whose adapter tensors are graph inputs named by peft name.

    Exported without constant folding so that each adapter parameter stays one named
    initializer (folding would transpose it into an anonymous one); onnxruntime folds the
    base's transposes itself when it loads the model, and cannot fold inputs. The adapter is
    traced with distinct random values: the exporter merges equal initializers (FedSA's
    all-zero global Bs), and the values do not matter once they are inputs."""
    saved = adapter.state()
    generator = torch.Generator().manual_seed(0)
    adapter.load_state({name: torch.randn(value.shape, generator=generator) for name, value in saved.items()})
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # padding, so the mask is traced
    torch.onnx.export(
        Classifier(adapter.model).eval(),
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=False,
    )
    adapter.load_state(saved)
    onnx_name = {}  # parameter object -> its name in the exported graph ("model." + module path)
    for full, param in adapter.model.named_parameters():
        onnx_name[id(param)] = f"model.{full}"
    renamed = {onnx_name[id(param)]: name for name, param in adapter.params.items()}
    model = onnx.load(str(path))
    moved = [init for init in model.graph.initializer if init.name in renamed]
    if len(moved) != len(renamed):
        raise RuntimeError(f"export: {len(renamed) - len(moved)} adapter tensors are not plain initializers")
    kept = [init for init in model.graph.initializer if init.name not in renamed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for init in moved:
        model.graph.input.append(onnx.helper.make_tensor_value_info(renamed[init.name], init.data_type, list(init.dims)))
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    onnx.save(model, str(path))

