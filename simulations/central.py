"""``fedtune train``: the centralized reference, the same trainer on all training data.

It runs as many optimizer steps as the federated run would in total
(rounds × clients per round × local steps: ``steps_per_round``), recorded in ``rounds`` chunks so its
metrics line up with a federated run's rounds. The optimizer restarts each chunk, as
it does on every client each round, and the strategy's trained roles are trained (FFA-LoRA's
A stays at its seeded init), so the only difference left is the federation.
``client.mode`` picks the trainer as on a client; ``privacy.mode: sample`` trains with
DP-SGD on the pooled data (what the privacy costs without a federation), its ledger in
the run directory.
"""

from __future__ import annotations

import random
import time
from typing import Any

from fedtune.client.job import resolve_mode
from fedtune.core.config import Config
from fedtune.core.dp_accounting import json_epsilon
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import build_adapter_model
from fedtune.engine.data import TaskSpec, encode
from fedtune.engine.evaluate import eval_set, evaluate
from fedtune.engine.partition import client_pool
from fedtune.engine.rounds import RoundBook, finish_run
from fedtune.engine.trainers import BudgetSpent, make_trainer
from fedtune.strategies import strategy_class


def steps_per_round(config: Config) -> int:
    """Optimizer steps the whole federation takes in one round."""
    return config.federation.clients_per_round() * config.client.local_steps


def check_central(config: Config) -> None:
    if config.privacy.mode == "client":
        raise UserError("privacy.mode client protects clients, and fedtune train has none: use sample or none")


def run_central(config: Config, run: RunDir, echo=print) -> dict[str, Any]:
    check_central(config)
    model = build_adapter_model(config, list(config.data.labels or []))
    train = encode(client_pool(config), TaskSpec.from_config(config), model.tokenizer, config.data.train)
    evaluation = eval_set(config, model)
    mode = resolve_mode(config.client.mode, model, train, config, 0.0, "central")
    steps = steps_per_round(config)
    if mode == "zo" and config.client.zo_steps:
        steps = config.client.zo_steps * config.federation.clients_per_round()
    params = model.trainable(strategy_class(config).plan.trained)  # FFA-LoRA's A stays frozen here too
    book = RoundBook(config, run, echo)
    extra: dict[str, Any] = {"total_steps": steps * config.federation.rounds}
    for rnd in range(1, config.federation.rounds + 1):
        round_start = time.time()
        try:
            trainer = make_trainer(config, mode, rnd, name="central", examples=len(train), steps=steps, state_dir=run.path)
        except BudgetSpent as spent:
            extra |= {"status": "budget-reached", "reason": f"before round {rnd}: {spent}"}
            break
        rng = random.Random(f"{config.seed}:central:{rnd}")
        for warning in trainer.preflight(model, params, train, config.client, "the training") if rnd == 1 else ():
            if warning:
                echo(f"WARNING: {warning}")
        result = trainer.train(model, params, train, config.client, rng, steps)
        record: dict[str, Any] = {"round": rnd, "train_loss": result.loss, "steps": result.steps}
        if "epsilon" in result.metrics:  # DP-SGD on the pooled data
            record.update(result.metrics, epsilon=json_epsilon(result.metrics["epsilon"]), delta=config.privacy.delta)
        if evaluation is not None and book.evaluates(rnd):
            metrics = evaluate(model, evaluation)
            record.update(eval_accuracy=metrics["accuracy"], eval_loss=metrics["loss"])
        book.close_round(record, round_start, model, model.state(), {"strategy": {}})
    return finish_run(run, config, "central", book.elapsed(), extra)
