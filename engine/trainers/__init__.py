"""Local trainers: peers behind one interface (see ``base.Trainer``), chosen by ``make_trainer``."""

from __future__ import annotations

from pathlib import Path

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.engine.trainers.backprop import BackpropTrainer
from fedtune.engine.trainers.base import Trainer, TrainResult
from fedtune.engine.trainers.dpsgd import DPSGDTrainer
from fedtune.engine.trainers.moments import MOMENTS_FILE
from fedtune.engine.trainers.zo import ZOTrainer


class BudgetSpent(Exception):
    """This round's DP-SGD steps would take the ledger past ``privacy.target_epsilon``; ``epsilon`` is spent."""

    def __init__(self, reason: str, epsilon: float) -> None:
        super().__init__(reason)
        self.epsilon = epsilon


def make_trainer(
    config: Config,
    mode: str,
    round_number: int,
    *,
    name: str,
    examples: int,
    steps: int,
    state_dir: Path,
) -> Trainer:
    """The trainer for a client's MODE (``backprop`` or ``zo``) in this round of the run.

    Under ``privacy.mode: sample`` it is DP-SGD with the client's ledger in STATE_DIR, its noise
    calibrated to the run's rounds of STEPS; a round that would exceed the target ε raises
    ``BudgetSpent`` (before any step is taken), and a ZO client is refused: DP-SGD needs
    gradients. With ``client.optimizer_state: kept`` the optimizer's state lives in STATE_DIR too.
    """
    kept = state_dir / MOMENTS_FILE if config.client.optimizer_state == "kept" else None
    if config.privacy.mode != "sample":
        return ZOTrainer(round_number, config.federation.rounds) if mode == "zo" else BackpropTrainer(kept)
    if mode != "backprop":
        raise UserError(f"{name} trains with --mode {mode}; privacy.mode sample (DP-SGD) needs backprop")
    trainer = DPSGDTrainer.for_client(config, state_dir, examples, name, round_number, steps, kept)
    if refusal := trainer.refusal(config.privacy.target_epsilon, steps):
        raise BudgetSpent(refusal, trainer.ledger.epsilon())
    return trainer


__all__ = ["BackpropTrainer", "BudgetSpent", "DPSGDTrainer", "TrainResult", "Trainer", "ZOTrainer", "make_trainer"]
