"""A closed-form linear probe: the classification head fitted to frozen features, before ZO.

Zeroth-order steps estimate one directional derivative at a time, so they cannot lift a
randomly initialised head out of chance (SST-2, MiniLM: loss 0.693 -> 0.693 in five rounds):
the head's few hundred coordinates need an informed start. The probe runs the model forward
over the client's own examples, records the input of the head's output layer (BERT's pooled
features), and solves ridge regression from those features to one-hot labels:
W = (XᵀX + λI)⁻¹ XᵀY with a bias column (penalised like the rest), λ = ``RIDGE`` × the mean
feature energy per dimension. Forward passes only, in the client's own batch size, so it fits
the memory of a ZO step.
"""

from __future__ import annotations

import torch

from fedtune.core.plan import role_of
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import ExampleSet
from fedtune.engine.trainers.base import to_device

RIDGE = 0.01  # relative to the mean diagonal of XᵀX/n; measured on SST-2 (any value 1e-3..1e-1 within 1 point)
MAX_EXAMPLES = 2048  # enough for a fit of a few hundred features (SST-2: 1,500 rows gave 75% on dev)
BATCH = 64  # when the caller has no batch size of its own


@torch.inference_mode()
def fit_linear_probe(
    model: AdapterModel, data: ExampleSet, max_examples: int = MAX_EXAMPLES, batch_size: int = BATCH
) -> dict[str, torch.Tensor]:
    """The head's output-layer weight and bias fitted to DATA's first MAX_EXAMPLES examples, by peft name,
    in batches of BATCH_SIZE (a ZO client passes its own, so the probe fits where its steps fit)."""
    weight_name, bias_name, layer = _output_layer(model)
    features, labels = [], []
    hook = layer.register_forward_hook(lambda _module, inputs, _output: features.append(inputs[0].float().cpu()))
    model.model.eval()
    try:
        by_length = sorted(range(min(len(data), max_examples)), key=data.length)  # batches pad little
        for start in range(0, len(by_length), batch_size):
            chosen = by_length[start : start + batch_size]
            batch = to_device(data.collate(chosen), model.device)
            labels.append(batch["labels"].cpu())
            model.model(**batch)
    finally:
        hook.remove()
    x = torch.cat(features).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = torch.nn.functional.one_hot(torch.cat(labels), layer.out_features).double()
    gram = x.T @ x
    ridge = RIDGE * float(gram.diagonal()[:-1].mean())
    solution = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), x.T @ y)  # (H + 1, C)
    return {weight_name: solution[:-1].T.float().contiguous(), bias_name: solution[-1].float().contiguous()}


def can_probe(model: AdapterModel) -> bool:
    """Whether the head is exactly one linear layer with a bias, one output per label: what the probe fits."""
    try:
        weight, bias, _ = _output_layer(model)
    except ValueError:
        return False
    return set(model.names(["head"])) == {weight, bias}


def _output_layer(model: AdapterModel) -> tuple[str, str, torch.nn.Linear]:
    """(weight name, bias name, module) of the head's last linear layer: the one that outputs the labels."""
    live = {id(param): name for name, param in model.params.items() if role_of(name) == "head"}
    for module in reversed(list(model.model.modules())):
        if isinstance(module, torch.nn.Linear) and id(module.weight) in live and module.bias is not None:
            if module.out_features == len(model.labels) and id(module.bias) in live:
                return live[id(module.weight)], live[id(module.bias)], module
    raise ValueError("the model has no trained linear head with one output per label")
