"""``fedtune train``: the centralized reference, the same trainer on all training data.

It runs as many optimizer steps as the federated run would in total
(rounds × clients per round × local steps), recorded in ``rounds`` chunks so its
metrics line up with a federated run's rounds. The optimizer restarts each chunk, as
it does on every client each round, so the only difference left is the federation.
``client.mode`` picks the trainer as on a client; ``privacy.mode: sample`` trains with
DP-SGD on the pooled data (what the privacy costs without a federation), its ledger in
the run directory.
"""

from __future__ import annotations

import random
import time
from typing import Any

from client.adapters import build_adapter_model
from client.data import TaskSpec, encode
from client.evaluate import evaluate
from client.job import resolve_mode
from client.privacy import PrivacyLedger
from client.trainers import Trainer, make_trainer
from client.trainers.dpsgd import DPSGDTrainer
from coordinator.checkpoint import save_checkpoint
from coordinator.federation import eval_set
from coordinator.report import finish_run, progress_line
from fedtune.config import Config
from fedtune.errors import UserError
from fedtune.plan import ROLES
from fedtune.privacy import json_epsilon
from fedtune.rundir import RunDir
from simulations.partition import client_pool


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
    zo_steps = config.client.zo_steps and config.client.zo_steps * config.federation.clients_per_round()
    settings = config.client.model_copy(update={"local_steps": steps_per_round(config), "zo_steps": zo_steps})
    central = config.model_copy(update={"client": settings})  # DP-SGD calibrates for these steps
    mode = resolve_mode(config.client.mode, model, train, config, 0.0, "central")
    params = model.trainable(ROLES)
    ledger = PrivacyLedger.load(run.path, config.privacy.delta) if config.privacy.mode == "sample" else None
    started = time.time()
    extra: dict[str, Any] = {"total_steps": settings.local_steps * config.federation.rounds}
    for rnd in range(1, config.federation.rounds + 1):
        round_start = time.time()
        trainer: Trainer = make_trainer(mode, rnd, config.federation.rounds)
        if ledger is not None:
            trainer = DPSGDTrainer.for_client(central, ledger, len(train), "central", rnd)
            if refusal := trainer.refusal(config.privacy.target_epsilon, settings.local_steps):
                extra |= {"status": "budget-reached", "reason": f"before round {rnd}: {refusal}"}
                break
        result = trainer.train(model, params, train, settings, random.Random(f"{config.seed}:central:{rnd}"))
        record: dict[str, Any] = {"round": rnd, "train_loss": result.loss, "steps": result.steps}
        if ledger is not None:
            ledger.save()
            record.update(epsilon=json_epsilon(ledger.epsilon()), delta=config.privacy.delta)
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
    return finish_run(run, config, "central", time.time() - started, extra)
