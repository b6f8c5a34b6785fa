"""Local trainers: peers behind one interface (see ``base.Trainer``)."""

from client.trainers.backprop import BackpropTrainer
from client.trainers.base import Trainer, TrainResult

TRAINERS: dict[str, type] = {"backprop": BackpropTrainer}

__all__ = ["TRAINERS", "BackpropTrainer", "TrainResult", "Trainer"]
