"""Evaluating an adapter model: accuracy and loss, or exact match for generation.

Classification reports cross-entropy and accuracy. A causal LM with label words is
scored as a choice: each label word's response is scored by its log-likelihood and the
best one is the prediction (the loss is the true response's token NLL). A causal LM
without label words generates greedily and reports exact match.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from fedtune.core.config import Config
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import IGNORE_INDEX, ExampleSet, TaskSpec, collate, encode, encode_prompt_response
from fedtune.engine.partition import server_eval_rows
from fedtune.engine.trainers.base import to_device


def eval_set(config: Config, model: AdapterModel) -> ExampleSet | None:
    """The server's evaluation data (``server_eval_rows``), at most ``data.eval_max_examples`` of it."""
    found = server_eval_rows(config)
    if found is None:
        return None
    rows, source = found
    limit = config.data.eval_max_examples
    if limit and limit < len(rows):
        rows = random.Random(config.seed).sample(rows, limit)
    return encode(rows, TaskSpec.from_config(config), model.tokenizer, source)


@torch.no_grad()
def evaluate(model: AdapterModel, data: ExampleSet, batch_size: int = 64) -> dict[str, float]:
    """Metrics of ``model`` on ``data``: ``accuracy``, ``loss`` and ``num-examples``."""
    if len(data) == 0:
        return {"accuracy": 0.0, "loss": 0.0, "num-examples": 0}
    model.model.eval()
    if data.spec.task == "classification":
        return _classification(model, data, batch_size)
    if data.spec.choices:
        return _choices(model, data, max(1, batch_size // max(1, len(data.spec.labels))))
    return _generation(model, data, batch_size)


def _classification(model: AdapterModel, data: ExampleSet, batch_size: int) -> dict[str, float]:
    loss, correct = 0.0, 0
    for _, batch in data.eval_batches(batch_size):
        batch = to_device(batch, model.device)
        logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    return {"accuracy": correct / len(data), "loss": loss / len(data), "num-examples": len(data)}


def _choices(model: AdapterModel, data: ExampleSet, batch_size: int) -> dict[str, float]:
    spec, tokenizer = data.spec, model.tokenizer
    loss, correct = 0.0, 0
    for indices, _ in data.eval_batches(batch_size):
        candidates = []
        for i in indices:
            prompt = spec.prompt.format(text=data.rows[i][spec.text_field])
            for label in spec.labels:
                candidates.append(encode_prompt_response(prompt, spec.response_text(label), tokenizer, spec.max_length))
        scores, token_counts = _response_logprobs(model, candidates)
        scores = scores.view(len(indices), len(spec.labels))
        token_counts = token_counts.view(len(indices), len(spec.labels))
        truth = torch.tensor([data.examples[i]["label"] for i in indices])
        correct += (scores.argmax(-1).cpu() == truth).sum().item()
        picked = scores.gather(1, truth.view(-1, 1).to(scores.device)).squeeze(1)
        counts = token_counts.gather(1, truth.view(-1, 1).to(token_counts.device)).squeeze(1)
        loss += (-picked / counts).sum().item()
    return {"accuracy": correct / len(data), "loss": loss / len(data), "num-examples": len(data)}


def _response_logprobs(model: AdapterModel, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each example's response tokens, and their count."""
    batch = to_device(collate(examples, model.tokenizer.pad_token_id), model.device)
    logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    mask = targets != IGNORE_INDEX
    picked = logprobs.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return picked.sum(1), mask.sum(1)


def _generation(model: AdapterModel, data: ExampleSet, batch_size: int) -> dict[str, float]:
    spec, tokenizer = data.spec, model.tokenizer
    loss, exact = 0.0, 0
    for indices, batch in data.eval_batches(batch_size):
        batch = to_device(batch, model.device)
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss += out.loss.item() * len(indices)
        prompts = [data.examples[i]["input_ids"][: data.examples[i]["prompt_len"]] for i in indices]
        references = [spec.response_text(str(data.rows[i][spec.label_field])) for i in indices]
        budget = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 2
        for generated, reference in zip(generate(model, prompts, budget), references):
            exact += generated.strip().casefold() == reference.strip().casefold()
    return {"accuracy": exact / len(data), "loss": loss / len(data), "num-examples": len(data)}


def generate(model: AdapterModel, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuation of left-padded prompts, decoded without special tokens."""
    tokenizer = model.tokenizer
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    output = model.model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention.to(model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
