"""Local trainers: peers behind one interface (see ``base.Trainer``)."""

from client.trainers.backprop import BackpropTrainer
from client.trainers.base import Trainer, TrainResult
from client.trainers.zo import ZOTrainer


def make_trainer(mode: str, round_number: int, rounds: int) -> Trainer:
    """The trainer for a client's mode (``backprop`` or ``zo``) at this point of the run."""
    return ZOTrainer(round_number, rounds) if mode == "zo" else BackpropTrainer()


__all__ = ["BackpropTrainer", "TrainResult", "Trainer", "ZOTrainer", "make_trainer"]
