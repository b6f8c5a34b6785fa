"""Reading labeled text, turning it into token ids for the task, and batching it.

Rows come from ``fedtune.core.records`` (files, the synthetic generator, HF datasets).
Classification uses ``text_field``/``label_field``;
causal LM renders ``data.prompt`` and ``data.response`` templates and puts the loss on
the response tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records, require_fields

IGNORE_INDEX = -100


def infer_labels(sources: Sequence[str], label_field: str) -> list[str]:
    """Sorted label values found in the given sources (the class index order)."""
    values: set[str] = set()
    for source in sources:
        rows = read_records(source)
        require_fields(rows, source, [label_field])
        values.update(str(row[label_field]) for row in rows)
    return sorted(values, key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))


@dataclass(frozen=True)
class TaskSpec:
    """What a row means for the model: the part of the config clients need to encode data."""

    task: str
    labels: tuple[str, ...]
    text_field: str
    label_field: str
    max_length: int
    prompt: str = "{text}"
    response: str = "{label}"
    label_words: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> TaskSpec:
        data = config.data
        return cls(
            task=config.model.task,
            labels=tuple(data.labels or ()),
            text_field=data.text_field,
            label_field=data.label_field,
            max_length=config.model.max_length,
            prompt=data.prompt,
            response=data.response,
            label_words=tuple((data.label_words or {}).items()),
        )

    @property
    def choices(self) -> bool:
        """Causal LM scored as a choice among label words (classification as generation)."""
        return self.task == "causal-lm" and bool(self.label_words)

    def response_text(self, label: str) -> str:
        return self.response.format(label=dict(self.label_words).get(label, label))


def sample_rate(batch_size: int, examples: int) -> float:
    """Poisson sampling rate that gives ``batch_size`` examples per step on average."""
    return min(1.0, batch_size / examples)


def expected_batch_size(rate: float, examples: int) -> int:
    """The mean size of a Poisson batch: what DP-SGD divides the summed gradient by."""
    return max(1, round(rate * examples))


def physical_chunks(chosen: list[int], limit: int | None, length: Callable[[int], int]) -> list[list[int]]:
    """A logical batch as the physical batches it is computed in (``client.max_physical_batch``);
    an empty draw is one empty chunk.

    Chunks take the examples in order of length: a step sums per-example gradients (clipped,
    under DP-SGD), so the grouping does not change it, and each chunk is padded only to its
    own longest example (SST-2 sentences, a DP-SGD step at logical batch 1,024 in chunks of 64:
    2.8x faster than chunks in drawing order, BENCHMARKS.md).
    """
    if not chosen or not limit or len(chosen) <= limit:
        return [chosen]
    ordered = sorted(chosen, key=length)
    return [ordered[start : start + limit] for start in range(0, len(ordered), limit)]


def poisson_sample(count: int, rate: float, rng: random.Random) -> list[int]:
    """Each of ``count`` example indices independently with probability ``rate``: the batch
    sampling DP-SGD's accountant assumes (the batch size varies and may be zero)."""
    return [i for i in range(count) if rng.random() < rate]


@dataclass
class ExampleSet:
    """Tokenized examples of one split, with training and evaluation batching."""

    examples: list[dict[str, Any]]
    pad_id: int
    spec: TaskSpec
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def length(self, index: int) -> int:
        """Tokens in example INDEX (what it is padded from)."""
        return len(self.examples[index]["input_ids"])

    def batches(self, batch_size: int, rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
        """Endless shuffled batches (reshuffled each epoch), for local training steps."""
        for chosen in self.shuffled(batch_size, rng):
            yield self.collate(chosen)

    def shuffled(self, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
        """Endless batches of example indices from shuffled epochs."""
        if not self.examples:
            raise UserError("no training examples on this client")
        order: list[int] = []
        while True:
            if len(order) < batch_size:
                fresh = list(range(len(self.examples)))
                rng.shuffle(fresh)
                order += fresh
            chosen, order = order[:batch_size], order[batch_size:]
            yield chosen

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in indices], self.pad_id)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Length-sorted batches (little padding), each with the example indices it holds."""
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i]["input_ids"]))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield chosen, collate([self.examples[i] for i in chosen], self.pad_id)


def encode(
    rows: Sequence[dict[str, Any]], spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, source: str
) -> ExampleSet:
    """Tokenize rows for the task; a label outside ``spec.labels`` is a data error."""
    rows = list(rows)
    label_index = {label: i for i, label in enumerate(spec.labels)}
    fields = [spec.text_field] + ([spec.label_field] if spec.label_field else [])
    if rows:
        require_fields(rows, source, fields)
    if spec.task == "classification" or spec.choices:
        for number, row in enumerate(rows, start=2):
            if str(row[spec.label_field]) not in label_index:
                raise UserError(
                    f"{source}: row {number}: label {row[spec.label_field]!r} is not one of the run's labels "
                    f"({', '.join(spec.labels)})"
                )
    if spec.task == "classification":
        texts = [str(row[spec.text_field]) for row in rows]
        ids = tokenizer(texts, truncation=True, max_length=spec.max_length)["input_ids"] if texts else []
        examples = [{"input_ids": x, "label": label_index[str(row[spec.label_field])]} for x, row in zip(ids, rows)]
    else:
        examples = [_encode_lm(row, spec, tokenizer) for row in rows]
        if spec.choices:
            for example, row in zip(examples, rows):
                example["label"] = label_index[str(row[spec.label_field])]
    return ExampleSet(examples=examples, pad_id=tokenizer.pad_token_id, spec=spec, rows=rows)


def encode_prompt_response(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, Any]:
    """Prompt + response + EOS, loss only on the response; long prompts lose their start."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max(1, max_length // 2)]
    prompt_ids = prompt_ids[-(max_length - len(response_ids)) :]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt_len": len(prompt_ids),
    }


def _encode_lm(row: dict[str, Any], spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    prompt = spec.prompt.format(text=row[spec.text_field])
    response = spec.response_text(str(row[spec.label_field]))
    return encode_prompt_response(prompt, response, tokenizer, spec.max_length)


def collate(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; LM labels pad with IGNORE_INDEX, class labels stack."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if "labels" in examples[0]:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, : len(example["labels"])] = torch.tensor(example["labels"])
        batch["labels"] = labels
    elif "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch


def holdout_split(
    rows: list[dict[str, Any]], fraction: float, seed: int | str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded split of a client's rows into (train, held-out); held-out gets at least one row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if fraction > 0 and len(rows) > 1 else 0
    held, train = order[:n_held], order[n_held:]
    return [rows[i] for i in train], [rows[i] for i in held]
