"""The run directory: the unit users hold, and a public contract.

<run>/config.yaml            resolved config (every default and path filled in)
<run>/metrics.jsonl          one JSON object per round
<run>/summary.json           final and best metrics, bytes, wall time
<run>/checkpoints/round-K/   PEFT adapter (adapter_config.json,
                             adapter_model.safetensors) + fedtune.json
<run>/clients/<name>/        per-client private state (e.g. FedSA's B)
<run>/plots/metrics.png      metrics against rounds
<run>/logs/                  full logs of the processes fedtune started; with
                             client-level DP also private-metrics.jsonl (un-noised
                             per-round statistics), private-client-loads.json and
                             private-summary.json (who took part): the operator's,
                             never to publish
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.core.config import Config, read_yaml_mapping, validate_config
from fedtune.core.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^round-(\d+)$")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def private_metrics_file(self) -> Path:
        return self.logs / "private-metrics.jsonl"

    def write_private(self, name: str, data: dict[str, Any]) -> None:
        """A JSON file of the operator's alone, under logs/ (what a DP release must not contain)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.logs / f"private-{name}").write_text(json.dumps(data, indent=2) + "\n")

    def read_private(self, name: str) -> dict[str, Any]:
        path = self.logs / f"private-{name}"
        return json.loads(path.read_text()) if path.is_file() else {}

    def client_dir(self, name: str) -> Path:
        return self.path / "clients" / name

    def checkpoint(self, round_number: int) -> Path:
        return self.checkpoints / f"round-{round_number}"

    @classmethod
    def create(cls, path: Path, config: Config) -> RunDir:
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.logs.mkdir(exist_ok=True)
        run.config_file.write_text(config.to_yaml())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory; anything else is a user error."""
        run = cls(Path(path))
        if not run.config_file.is_file():
            raise UserError(f"{path}: not a fedtune run directory (no config.yaml)")
        return run

    def config(self) -> Config:
        return validate_config(read_yaml_mapping(self.config_file), source=str(self.config_file))

    def completed_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and (child / "fedtune.json").is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_checkpoint(self, round_number: int | None = None) -> Path:
        rounds = self.completed_rounds()
        if not rounds:
            raise UserError(f"{self.path}: no checkpoint yet (checkpoints/round-K/ is written after each round)")
        if round_number is None:
            return self.checkpoint(rounds[-1])
        if round_number not in rounds:
            raise UserError(f"--round {round_number}: no such checkpoint in {self.path} (have {rounds})")
        return self.checkpoint(round_number)

    def append_metrics(self, record: dict[str, Any], private: dict[str, Any] | None = None) -> None:
        """One round's record; PRIVATE (statistics a DP release must not contain) goes under logs/."""
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if private:
            with open(self.private_metrics_file, "a") as handle:
                handle.write(json.dumps({"round": record["round"], **private}, allow_nan=False) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop records after ``last_round`` (a resumed run rewrites them)."""
        for path in (self.metrics_file, self.private_metrics_file):
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if json.loads(line).get("round", 0) <= last_round]
                path.write_text("".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        if not self.summary_file.is_file():
            raise UserError(f"{self.path}: no summary.json (the run did not finish)")
        return json.loads(self.summary_file.read_text())
