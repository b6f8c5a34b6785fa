"""Splitting one labeled source across N simulated clients, with flwr-datasets partitioners.

``iid`` (IidPartitioner), ``dirichlet`` (DirichletPartitioner: label skew, smaller
alpha = more skew) and ``field`` (NaturalIdPartitioner: one client per value of a
column, e.g. the synthetic task's ``domain``). Each client then holds out
``data.holdout`` of its partition for local evaluation. Everything is seeded.
"""

from __future__ import annotations

import functools
from typing import Any

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records, require_fields
from fedtune.engine.data import holdout_split

INDEX_COLUMN = "__row__"


def make_partitioner(kind: str, clients: int, column: str, alpha: float, seed: int, min_size: int) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=clients)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=clients, partition_by=column, alpha=alpha, min_partition_size=min_size, seed=seed
        )
    return NaturalIdPartitioner(partition_by=column)


def client_pool(config: Config) -> tuple[dict[str, Any], ...]:
    """The rows of data.train that clients share out (all but the server's holdout)."""
    return train_and_server_rows(config.data.train, config.data.server_holdout, config.seed)[0]


@functools.lru_cache(maxsize=8)
def train_and_server_rows(
    source: str, server_holdout: float, seed: int
) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """(client pool, server eval rows): a seeded ``server_holdout`` slice never reaches a client."""
    rows = read_records(source)
    if not server_holdout:
        return rows, ()
    pool, held = holdout_split(list(rows), server_holdout, seed=seed + 7919)
    return tuple(pool), tuple(held)


def server_eval_rows(config: Config) -> tuple[list[dict[str, Any]], str] | None:
    """(rows, source) the server evaluates on: data.eval, else the server's holdout of data.train."""
    if config.data.eval:
        return list(read_records(config.data.eval)), config.data.eval
    if config.data.train and config.data.server_holdout:
        held = train_and_server_rows(config.data.train, config.data.server_holdout, config.seed)[1]
        return list(held), f"{config.data.train} (server holdout)"
    return None


@functools.lru_cache(maxsize=8)
def partition_rows(
    source: str, server_holdout: float, kind: str, clients: int, column: str, alpha: float, seed: int, min_size: int
) -> tuple[tuple[int, ...], ...]:
    """Indices into the client pool for every partition (cached: clients in one process share it)."""
    rows = train_and_server_rows(source, server_holdout, seed)[0]
    require_fields(rows, source, [column])
    table = datasets.Dataset.from_dict({column: [str(r[column]) for r in rows], INDEX_COLUMN: list(range(len(rows)))})
    partitioner = make_partitioner(kind, clients, column, alpha, seed, min_size)
    partitioner.dataset = table
    try:  # Dirichlet draws its split here, on first use: it may fail to give every client min_size rows
        found = partitioner.num_partitions
        if found == clients:
            return tuple(tuple(partitioner.load_partition(i)[INDEX_COLUMN]) for i in range(clients))
    except ValueError as err:
        raise UserError(
            f"data.partition: {kind} (alpha {alpha:g}) could not give each of {clients} clients at least "
            f"min_size {min_size} of {len(rows)} rows ({err}); raise data.partition.alpha, lower "
            "data.partition.min_size or federation.clients, or use kind iid"
        ) from None
    raise UserError(
        f"data.partition: column {column!r} has {found} distinct values, so federation.clients must be {found} "
        f"(got {clients})"
    )


def client_partition(config: Config, partition_id: int) -> list[dict[str, Any]]:
    """All rows of simulated client ``partition_id`` (before its local holdout split)."""
    data = config.data
    if data.partition.kind == "field" and not data.partition.field:
        raise UserError("data.partition.field: required when data.partition.kind is field (e.g. domain)")
    parts = partition_rows(
        data.train,
        data.server_holdout,
        data.partition.kind,
        config.federation.clients,
        data.partition.field or data.label_field,
        data.partition.alpha,
        config.seed,
        data.partition.min_size,
    )
    rows = client_pool(config)
    return [rows[i] for i in parts[partition_id]]


def client_rows(config: Config, partition_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) rows of simulated client ``partition_id``, split as an agent with that name splits."""
    return holdout_split(
        client_partition(config, partition_id), config.data.holdout, seed=f"{config.seed}:client-{partition_id}"
    )
