"""Reading and encoding labeled text: file formats, templates, and clear data errors."""

from __future__ import annotations

import json

import pytest

from conftest import shared_data
from fedtune.core.errors import UserError
from fedtune.core.records import read_records
from fedtune.core.synthetic import generate
from fedtune.engine.base_model import load_tokenizer
from fedtune.engine.data import IGNORE_INDEX, TaskSpec, encode, infer_labels


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm-l6")


def test_tsv_is_read_without_quote_processing():
    assert len(read_records(str(shared_data("sst2", "dev.tsv")))) == 6735
    rows = read_records(str(shared_data("agnews", "train.tsv")))
    assert len(rows) == 10001 and set(rows[0]) == {"text", "label"}  # the data README says 10,000
    assert sum(row["text"].startswith('"') for row in rows) > 100  # quotes are text, not CSV quoting
    assert {row["label"] for row in rows} == {"World", "Sports", "Business", "Sci/Tech"}


def test_jsonl_csv_and_json_sources(tmp_path):
    rows = [{"text": "a, b", "label": "x"}, {"text": 'say "hi"', "label": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('text,label\n"a, b",x\n"say ""hi""",y\n')
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert list(read_records(str(tmp_path / name))) == rows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\nnot json\n', "cannot parse as jsonl"),
        ("", "no rows"),
        ("[1, 2]", "expected rows of named columns"),
    ],
)
def test_broken_files_are_one_clear_error(tmp_path, content, message):
    suffix = ".json" if content.startswith("[") else ".jsonl"
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_records(str(path))


def test_missing_column_and_unknown_label_name_the_problem(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"sentence": "fine", "label": "maybe"}) + "\n")
    rows = read_records(str(path))
    spec = TaskSpec("classification", ("no", "yes"), "text", "label", 32)
    with pytest.raises(UserError, match="no column 'text'.*columns: sentence, label"):
        encode(rows, spec, tokenizer, str(path))
    spec = TaskSpec("classification", ("no", "yes"), "sentence", "label", 32)
    with pytest.raises(UserError, match="row 2: label 'maybe' is not one of the run's labels"):
        encode(rows, spec, tokenizer, str(path))


def test_labels_sort_numerically_when_numeric():
    assert infer_labels([str(shared_data("sst2", "dev.tsv"))], "label") == ["0", "1"]


def test_causal_lm_loss_is_on_the_response_only():
    tokenizer = load_tokenizer("smollm2-135m")
    spec = TaskSpec(
        "causal-lm",
        ("negative", "positive"),
        "text",
        "label",
        64,
        prompt="Review: {text}\nSentiment:",
        response=" {label}",
        label_words=(("negative", "bad"), ("positive", "good")),
    )
    example = encode([{"text": "great film", "label": "positive"}], spec, tokenizer, "mem").examples[0]
    n = example["prompt_len"]
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    response = tokenizer.decode([t for t in example["labels"][n:]], skip_special_tokens=True)
    assert response == " good" and example["labels"][-1] == tokenizer.eos_token_id
    assert example["label"] == 1


def test_long_prompts_keep_the_response():
    tokenizer = load_tokenizer("smollm2-135m")
    spec = TaskSpec("causal-lm", (), "text", "label", 24, prompt="{text}", response=" {label}")
    example = encode([{"text": "word " * 200, "label": "the answer"}], spec, tokenizer, "mem").examples[0]
    assert len(example["input_ids"]) <= 24
    assert tokenizer.decode(example["input_ids"][example["prompt_len"] :], skip_special_tokens=True) == " the answer"


def test_synthetic_task_is_deterministic_multi_domain_and_disjoint():
    train, again, held = generate("support/train"), generate("support/train"), generate("support/eval")
    assert train == again and len(train) == 3000 and len(held) == 600
    assert {r["domain"] for r in train} == {"banking", "travel", "retail", "telecom", "health"}
    assert {r["label"] for r in train} == {"complaint", "question", "praise"}
    assert not {r["text"] for r in train} & {r["text"] for r in held}
