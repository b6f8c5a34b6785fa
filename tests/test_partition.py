"""Partitioning across simulated clients: sizes, skew vs alpha, determinism, field split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from conftest import shared_data
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records
from fedtune.engine.data import holdout_split
from fedtune.engine.partition import client_rows, partition_rows

SYNTH = "synthetic:support/train"


def _parts(kind: str, clients: int, alpha: float = 0.5, seed: int = 0, column: str = "label", source: str = SYNTH):
    return partition_rows(source, 0.0, kind, clients, column, alpha, seed, 10)


def _label_skew(source: str, parts) -> float:
    """Mean over clients of the share of the client's most common label (1/k = balanced, 1 = one label)."""
    rows = read_records(source)
    shares = []
    for part in parts:
        counts = Counter(str(rows[i]["label"]) for i in part)
        shares.append(max(counts.values()) / len(part))
    return float(np.mean(shares))


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_cover_every_row_exactly_once(kind):
    parts = _parts(kind, 7)
    flat = [i for part in parts for i in part]
    assert len(parts) == 7 and all(len(p) >= 10 for p in parts)
    assert sorted(flat) == list(range(len(read_records(SYNTH))))


def test_iid_partitions_are_balanced_in_size_and_labels():
    parts = _parts("iid", 6)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _label_skew(SYNTH, parts) < 0.45  # 3 labels: ~1/3 each


def test_label_skew_grows_as_alpha_shrinks():
    source = str(shared_data("sst2", "train.tsv"))
    skews = [_label_skew(source, _parts("dirichlet", 10, alpha=a, source=source)) for a in (10.0, 0.5, 0.1)]
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.65 and skews[2] > 0.85, skews


def test_partitions_are_deterministic_per_seed():
    first = _parts("dirichlet", 5, seed=3)
    partition_rows.cache_clear()
    assert _parts("dirichlet", 5, seed=3) == first
    assert _parts("dirichlet", 5, seed=4) != first


def test_field_partition_gives_one_client_per_value():
    parts = _parts("field", 5, column="domain")
    rows = read_records(SYNTH)
    domains = [{rows[i]["domain"] for i in part} for part in parts]
    assert all(len(d) == 1 for d in domains) and len(set.union(*domains)) == 5


def test_field_partition_rejects_a_wrong_client_count():
    with pytest.raises(UserError, match="federation.clients must be 5"):
        _parts("field", 4, column="domain")


def test_a_dirichlet_split_that_cannot_fill_every_client_is_one_clear_error():
    source = str(shared_data("sst2", "train.tsv"))
    with pytest.raises(UserError, match="could not give each of 1000 clients at least min_size 10") as raised:
        _parts("dirichlet", 1000, alpha=0.5, source=source)
    assert "raise data.partition.alpha" in str(raised.value)


def test_client_rows_hold_out_part_of_each_partition():
    config = Config.model_validate(
        {
            "federation": {"clients": 3},
            "data": {"train": SYNTH, "holdout": 0.2, "partition": {"kind": "iid"}},
        }
    )
    train, held = client_rows(config, 1)
    assert len(held) == pytest.approx(0.2 * (len(train) + len(held)), abs=1)
    assert not {r["text"] for r in train} & {r["text"] for r in held}


def test_holdout_split_is_seeded():
    rows = [{"i": i} for i in range(50)]
    assert holdout_split(rows, 0.1, seed=1) == holdout_split(rows, 0.1, seed=1)
    assert holdout_split(rows, 0.1, seed=1) != holdout_split(rows, 0.1, seed=2)
