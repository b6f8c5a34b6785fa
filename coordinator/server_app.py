"""The Flower ServerApp: reads the run's config and directory, then runs the rounds.

``agent-identity = "registered"`` (set by ``fedtune coordinator`` with agent keys): each
node's name is the one its key was registered under; otherwise names are as claimed.
``"simulated"`` (set by ``fedtune simulate``): the coordinator may read the partitions.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.coordinator.federation import RoundRunner
from fedtune.coordinator.identity import registered_names
from fedtune.core.config import parse_config_text
from fedtune.core.processes import exit_when_orphaned
from fedtune.core.rundir import RunDir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_when_orphaned()  # a ServerApp must not outlive a killed coordinator
    config = parse_config_text(str(context.run_config["fedtune-config"]))
    run = RunDir.open(str(context.run_config["run-dir"]))
    registered = registered_names if context.run_config.get("agent-identity") == "registered" else None
    simulated = context.run_config.get("agent-identity") == "simulated"  # fedtune simulate says so
    RoundRunner.prepare(config, run, registered, simulated=simulated).run_rounds(grid)
