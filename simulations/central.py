"""``fedtune train``: the centralized reference, the same trainer on all training data.

It runs as many optimizer steps as the federated run would in total
(rounds × clients per round × local steps), recorded in ``rounds`` chunks so its
metrics line up with a federated run's rounds. The optimizer restarts each chunk, as
it does on every client each round, so the only difference left is the federation.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from client.adapters import build_adapter_model
from client.data import TaskSpec, encode
from client.evaluate import evaluate
from client.trainers import BackpropTrainer
from coordinator.checkpoint import save_checkpoint
from coordinator.federation import eval_set
from coordinator.report import finish_run, progress_line
from fedtune.config import Config
from fedtune.plan import ROLES
from fedtune.rundir import RunDir
from simulations.partition import client_pool


def steps_per_round(config: Config) -> int:
    """Optimizer steps the whole federation takes in one round."""
    fed = config.federation
    clients_per_round = min(fed.clients, max(fed.min_clients, math.ceil(fed.fraction * fed.clients)))
    return clients_per_round * config.client.local_steps


def run_central(config: Config, run: RunDir, echo=print) -> dict[str, Any]:
    model = build_adapter_model(config, list(config.data.labels or []))
    train = encode(client_pool(config), TaskSpec.from_config(config), model.tokenizer, config.data.train)
    evaluation = eval_set(config, model)
    settings = config.client.model_copy(update={"local_steps": steps_per_round(config)})
    params = model.trainable(ROLES)
    started = time.time()
    for rnd in range(1, config.federation.rounds + 1):
        round_start = time.time()
        result = BackpropTrainer().train(model, params, train, settings, random.Random(f"{config.seed}:central:{rnd}"))
        record: dict[str, Any] = {"round": rnd, "train_loss": result.loss, "steps": result.steps}
        if evaluation is not None and (
            rnd == config.federation.rounds
            or (config.federation.eval_every and rnd % config.federation.eval_every == 0)
        ):
            metrics = evaluate(model, evaluation)
            record.update(eval_accuracy=metrics["accuracy"], eval_loss=metrics["loss"])
        record["wall_s"] = round(time.time() - round_start, 3)
        record["elapsed_s"] = round(time.time() - started, 3)
        run.append_metrics(record)
        save_checkpoint(run, rnd, model, model.state(), {"strategy": {}, "elapsed_s": record["elapsed_s"]})
        echo(progress_line(record, config.federation.rounds))
    return finish_run(
        run, config, "central", time.time() - started, {"total_steps": settings.local_steps * config.federation.rounds}
    )
