"""The Flower ClientApp: train and evaluate handlers that follow the strategy's plan.

Nothing here knows whether it runs in the Simulation Engine or behind a SuperNode,
nor which strategy the coordinator runs: the message's plan says which adapter roles
to train, send and keep private.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import secagg as secure
from fedtune.client.job import SHARED_MODEL, ClientJob, process_tag
from fedtune.core import wire
from fedtune.core.plan import ParameterPlan
from fedtune.core.secagg import SecAggError
from fedtune.engine.evaluate import evaluate as evaluate_model
from fedtune.engine.trainers import BudgetSpent, make_trainer
from fedtune.engine.trainers.base import seeded_torch
from fedtune.engine.trainers.probe import fit_linear_probe

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = ClientJob.for_context(context)
    config = msg.content["config"]
    plan = ParameterPlan.from_record(dict(config))
    round_number = int(config["round"])
    received = job.fit_rank(plan, wire.decode(msg.content["arrays"], msg.content["layout"]))
    masking = msg.content["secagg"] if "secagg" in msg.content.config_records else None
    bad = secure.open_envelopes(context.node_id, masking) if masking is not None else []
    job.load(plan, received, msg.content)
    params = job.model.trainable(plan.trained)
    started = time.perf_counter()
    rng = job.rng(round_number)
    try:
        trainer = make_trainer(
            job.config, job.mode, round_number, name=job.name, examples=len(job.train),
            steps=job.config.client.local_steps, state_dir=job.state_dir,
        )  # fmt: skip
    except BudgetSpent as spent:
        secure.forget(context.node_id)
        print(f"fedtune: {job.name}: {spent}", flush=True)
        metrics = {"num-examples": len(job.train), "epsilon": spent.epsilon}
        info = {"name": job.name, "privacy-spent": str(spent)}
        return Message(RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord(info)}), reply_to=msg)
    if job.probes_head(plan, round_number):
        return _head_probe(msg, job, plan)
    if "data-path" in context.node_config:  # an agent judges itself; simulated: the coordinator judged the median one
        for warning in trainer.preflight(job.model, params, job.train, job.config.client, "this client's"):
            if warning:
                print(f"fedtune: WARNING: {job.name}: {warning}", flush=True)
    with seeded_torch(rng.getrandbits(63), job.model.device):
        result = trainer.train(job.model, params, job.train, job.config.client, rng)
    job.save_private(plan)
    metrics = {
        "num-examples": len(job.train),
        "train_s": time.perf_counter() - started,
        "steps": result.steps,
        **result.metrics,
    }
    if trainer.releases_loss:  # DP-SGD's loss is not privatised, so it stays here
        metrics["train_loss"] = result.loss
    info = _train_info(job, plan)
    if masking is not None:
        update = _masked(context.node_id, job.model.state(plan.sent), received, masking, bad)
    elif result.zo_steps and job.config.client.zo_upload == "seeds":
        update = wire.encode_seeds(result.zo_steps, job.config.client.weight_decay)
    else:
        update = wire.encode(job.model.state(plan.sent), str(config["compression"]))
    content = RecordDict({**update, "metrics": MetricRecord(metrics), "info": ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


def _masked(node: int, sent: dict[str, torch.Tensor], received: dict[str, torch.Tensor], record: ConfigRecord, bad: list[int]) -> dict:
    """The secure-aggregation upload: this client's change from the broadcast, weighted and masked."""
    names = record.get("names")
    if not isinstance(names, list) or names != sorted(sent) or not set(names) <= set(received):
        secure.forget(node)
        raise SecAggError("secure aggregation: the release layout is not this round's sent tensors")
    release = np.concatenate([(sent[n].double() - received[n].double()).reshape(-1).cpu().numpy() for n in names])
    vector, _ = secure.masked_release(node, release, record.get("weight"), record)
    return {"masked": ArrayRecord({"values": Array(vector)}), "secagg": ConfigRecord({"bad": bad})}


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 1: fresh keys for this attempt, and the example count (the weight)."""
    job = ClientJob.for_context(context)
    record = secure.setup(context.node_id, msg.content["config"])
    return _stage_reply(msg, job, record, {"num-examples": len(job.train)})


@app.train("secagg_share_keys")
def secagg_share_keys(msg: Message, context: Context) -> Message:
    job = ClientJob.for_context(context)
    return _stage_reply(msg, job, secure.share_keys(context.node_id, msg.content["config"]))


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    job = ClientJob.for_context(context)
    return _stage_reply(msg, job, secure.unmask(context.node_id, msg.content["config"]))


def _stage_reply(msg: Message, job: ClientJob, record: ConfigRecord, metrics: dict | None = None) -> Message:
    records: dict = {"secagg": record, "info": ConfigRecord({"name": job.name})}
    if metrics:
        records["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=msg)


def _train_info(job: ClientJob, plan: ParameterPlan) -> dict[str, str | int]:
    """What a train reply says about its client (strategies/updates.py checks each field)."""
    return {
        "name": job.name,
        "process": process_tag(),
        "model-loads": SHARED_MODEL.loads,
        "frozen-checksum": job.frozen_checksum(plan),
        "mode": job.mode,
        "rank": job.rank,
    }


def _head_probe(msg: Message, job: ClientJob, plan: ParameterPlan) -> Message:
    """A ZO client's first round: the head fitted to its data (``wire.encode_head_probe``), no ZO steps."""
    started = time.perf_counter()
    head = fit_linear_probe(job.model, job.train, batch_size=job.config.client.batch_size)
    metrics = {"num-examples": len(job.train), "train_s": time.perf_counter() - started, "steps": 0}
    info = ConfigRecord(_train_info(job, plan))
    content = RecordDict({**wire.encode_head_probe(head), "metrics": MetricRecord(metrics), "info": info})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The coordinator's end-of-run notice: acknowledged (the agent's executor acts on it)."""
    return Message(
        RecordDict({"info": ConfigRecord({"event": str(msg.content["config"].get("event", ""))})}), reply_to=msg
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job = ClientJob.for_context(context)
    plan = ParameterPlan.from_record(dict(msg.content["config"]))
    received = job.fit_rank(plan, wire.decode(msg.content["arrays"], msg.content["layout"]))
    job.load(plan, received, msg.content)
    metrics = evaluate_model(job.model, job.holdout)
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"name": job.name})})
    return Message(content=content, reply_to=msg)
