"""``fedtune simulate``: N clients on this machine through Flower's Simulation Engine.

A SuperLink in simulation mode runs the ServerApp and the Ray-backed Simulation Engine
with ``federation.clients`` virtual SuperNodes; partition ``i`` of ``data.train`` is
client ``i``'s private data. Only fedtune's per-round lines reach the terminal; the
full Flower/Ray log is kept in ``logs/flower.log``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.coordinator.superlink import SuperLink, log_and_echo
from fedtune.core.app import APP_DIR
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.records import read_records, require_fields
from fedtune.core.rundir import RunDir
from fedtune.engine.partition import partition_rows


def check_data(config: Config) -> None:
    """Surface data problems here, as one line, rather than inside a Ray worker."""
    data = config.data
    fields = [data.text_field, data.label_field]
    for source in filter(None, (data.train, data.eval)):
        require_fields(read_records(source), source, fields)
    column = data.partition.field or data.label_field
    partition_rows(
        data.train,
        data.server_holdout,
        data.partition.kind,
        config.federation.clients,
        column,
        data.partition.alpha,
        config.seed,
        data.partition.min_size,
    )


def backend_resources(config: Config) -> dict[str, int | float]:
    """Ray resources per simulated client: all cores unless configured, a GPU if present."""
    import torch

    simulation = config.simulation
    if simulation.ray_address is not None:  # the cluster's nodes count, not this machine (client_cpus: config)
        return {
            "client-resources-num-cpus": simulation.client_cpus,
            "client-resources-num-gpus": simulation.client_gpus or 0.0,
        }
    cores = os.cpu_count() or 1
    cpus = min(simulation.client_cpus or cores, cores)
    gpus = simulation.client_gpus
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    return {"client-resources-num-cpus": cpus, "client-resources-num-gpus": gpus}


def run_simulation(config: Config, run: RunDir, echo=print, app_dir: Path = APP_DIR) -> dict:
    """Run the federated simulation described by a resolved ``config`` into ``run``."""
    echo("fedtune: checking the data and partitions")
    check_data(config)
    echo(f"fedtune: starting Flower's Simulation Engine (Ray) for {config.federation.clients} clients")
    log_path = run.logs / "flower.log"
    resources = backend_resources(config)
    environment = {"RAY_ADDRESS": config.simulation.ray_address} if config.simulation.ray_address else {}
    if environment:
        echo(f"fedtune: clients run on the Ray cluster at {config.simulation.ray_address}")
    superlink = SuperLink(simulation=True, log_file=run.logs / "superlink.log", environment=environment)
    with open(log_path, "a") as log, superlink as link:
        federation = {"num-supernodes": config.federation.clients, **resources}
        run_config = {"fedtune-config": config.to_yaml(), "run-dir": str(run.path), "agent-identity": "simulated"}
        link.submit(run_config, federation, log_and_echo(log, echo), app_dir)
    try:
        return run.summary()
    except UserError:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-25:])
        raise UserError(f"the simulation failed; last lines of {log_path}:\n{tail}") from None
