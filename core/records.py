"""Reading labeled rows from a source, with no ML imports (the edge runtime uses it too).

Sources: local ``.jsonl``/``.json``/``.csv``/``.tsv`` files (TSV without quote
processing: quotes are text), the built-in synthetic generator
(``synthetic:NAME/SPLIT``) and, for online users, Hugging Face datasets
(``hf:PATH[#CONFIG][:SPLIT]``). Problems are ``UserError``s naming file and row.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune.core.errors import UserError

SYNTHETIC_PREFIX = "synthetic:"
HF_PREFIX = "hf:"
csv.field_size_limit(2**31 - 1)


@functools.lru_cache(maxsize=8)
def read_records(source: str) -> tuple[dict[str, Any], ...]:
    """All rows of a source, cached per process (simulated clients share one read)."""
    if source.startswith(SYNTHETIC_PREFIX):
        from fedtune.core.synthetic import generate

        return tuple(generate(source[len(SYNTHETIC_PREFIX) :]))
    if source.startswith(HF_PREFIX):
        return tuple(_read_hf(source[len(HF_PREFIX) :]))
    path = Path(source)
    if not path.is_file():
        raise UserError(f"data file not found: {source}")
    suffix = path.suffix.lower()
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in handle if line.strip()]
            elif suffix == ".json":
                rows = json.load(handle)
            elif suffix == ".tsv":
                rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
            elif suffix == ".csv":
                rows = list(csv.DictReader(handle))
            else:
                raise UserError(f"{source}: unsupported file type {suffix!r}; allowed: .jsonl, .json, .csv, .tsv")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{source}: cannot parse as {suffix[1:]} ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{source}: expected rows of named columns (one JSON object per row)")
    if not rows:
        raise UserError(f"{source}: no rows")
    return tuple(rows)


def require_fields(rows: Sequence[dict[str, Any]], source: str, fields: Sequence[str]) -> None:
    columns = list(rows[0])
    for name in fields:
        if name not in columns:
            raise UserError(
                f"{source}: no column {name!r} (columns: {', '.join(columns)}); set data.text_field / data.label_field"
            )
        for number, row in enumerate(rows, start=2):
            if row.get(name) in (None, ""):
                raise UserError(f"{source}: row {number}: empty {name!r}")


def _read_hf(spec: str) -> list[dict[str, Any]]:
    match = re.fullmatch(r"(?P<path>[^#:]+)(?:#(?P<name>[^:]+))?(?::(?P<split>.+))?", spec)
    if not match:
        raise UserError(f"hf:{spec}: expected hf:PATH[#CONFIG][:SPLIT], e.g. hf:stanfordnlp/sst2:train")
    try:
        import datasets

        dataset = datasets.load_dataset(match["path"], match["name"], split=match["split"] or "train")
    except Exception as err:  # network, auth, unknown dataset: all user-facing
        raise UserError(f"hf:{spec}: cannot load from the Hugging Face hub ({str(err).splitlines()[0]})") from None
    return [dict(row) for row in dataset]
