"""The Flower ServerApp: reads the run's config and directory, then runs the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import Federation
from fedtune.config import parse_config_text
from fedtune.rundir import RunDir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = parse_config_text(str(context.run_config["fedtune-config"]))
    run = RunDir.open(str(context.run_config["run-dir"]))
    Federation.prepare(config, run).run_rounds(grid)
