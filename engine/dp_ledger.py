"""A client's sample-level privacy ledger: Opacus' RDP accountant, kept across rounds.

The accountant's history is the whole privacy state; it is saved in the client's state
dir after every round, so the budget survives agent restarts and coordinator resumes.
Before a round the client asks what ε its steps would bring and refuses to train past
``privacy.target_epsilon``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opacus.accountants import RDPAccountant

from fedtune.core.atomic import staged_file
from fedtune.core.dp_accounting import history_epsilon

LEDGER_FILE = "privacy.json"


@dataclass
class PrivacyLedger:
    path: Path | None  # None: kept in memory only (the coordinator's preflight of a simulated client)
    delta: float
    accountant: RDPAccountant = field(default_factory=RDPAccountant)

    @classmethod
    def load(cls, state_dir: Path, delta: float) -> PrivacyLedger:
        ledger = cls(state_dir / LEDGER_FILE, delta)
        if ledger.path.is_file():
            ledger.accountant.history = [tuple(entry) for entry in json.loads(ledger.path.read_text())["history"]]
        return ledger

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        return history_epsilon(self.accountant.history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return history_epsilon([*self.accountant.history, (noise_multiplier, sample_rate, steps)], self.delta)

    def save(self) -> None:
        if self.path is None:
            return
        with staged_file(self.path) as staging:
            staging.write_text(json.dumps({"accountant": "rdp", "delta": self.delta, "history": self.accountant.history}))
