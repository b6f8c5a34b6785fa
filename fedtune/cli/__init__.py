"""The top floor: the ``fedtune`` command and the config resolution it does before any command runs."""

from fedtune.cli.commands import main

__all__ = ["main"]
