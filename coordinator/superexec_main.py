"""Flower's ``flower-superexec`` for a deployed coordinator, launching fedtune's app only.

The SuperLink hands every submitted run's ServerApp task to its superexec, which installs
the run's FAB and executes its code on the coordinator host. A deployed coordinator
runs one app, fedtune's code-free one (core/app.py); any other FAB is refused before
anything of it is installed or imported, with one log line. Otherwise this is Flower's
superexec, unchanged.

    python -m fedtune.coordinator.superexec_main <flower-superexec arguments>
"""

from __future__ import annotations

import sys
from logging import ERROR

from fedtune.core import flower_internals as flower
from fedtune.core.app import app_fab_hash
from fedtune.core.flower_internals import LaunchResult, log

runner = flower.superexec_runner


class FedtuneAppOnly(runner.AutoExecPlugin):
    """Launches a task only when its FAB is fedtune's own app."""

    def launch_task(self, token: str, task) -> LaunchResult:  # noqa: ANN001 (Flower's Task proto)
        if task.fab_hash != app_fab_hash():
            log(
                ERROR,
                "[fedtune] refused run %d: its app is not fedtune's (FAB %s); this coordinator runs only fedtune",
                task.run_id,
                task.fab_hash[:12] or "none",
            )
            return LaunchResult.failed("refused: only fedtune's own app runs on this coordinator")
        return super().launch_task(token, task)


if __name__ == "__main__":
    runner.AutoExecPlugin = FedtuneAppOnly
    sys.argv[0] = "flower-superexec"
    sys.exit(flower.superexec_cli.flower_superexec())
