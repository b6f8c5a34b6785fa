"""A client's standing state across rounds: config, its data, the shared model, private tensors.

Process-level caches make a long-lived client process (a Ray actor in simulation, the
agent's ClientApp process in deployment) load the base model once and tokenize its
data once; every message then only swaps adapter tensors. Simulated clients that share
a process share the model object, so each message sets *all* adapter tensors:
received global values, else this client's private values, else the seeded init.
"""

from __future__ import annotations

import functools
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file, save_file

from fedtune import wire
from fedtune.atomic import staged_file
from fedtune.config import PER_CLIENT_RANK_STRATEGIES, Config, parse_config_text
from fedtune.engine.adapters import AdapterModel, build_adapter_model, initial_state, with_rank
from fedtune.engine.checkpoint import PRIVATE_FILE
from fedtune.engine.data import ExampleSet, TaskSpec, encode, holdout_split
from fedtune.engine.trainers.probe import can_probe
from fedtune.errors import UserError
from fedtune.plan import ParameterPlan, checksum
from fedtune.ranks import RANK_AUTO, rank_of, resize
from fedtune.records import read_records
from fedtune.rundir import RunDir

parse_config = functools.lru_cache(maxsize=4)(parse_config_text)


class SharedModel:
    """The process's adapter model, one per model definition, so the base model loads once;
    clients of other LoRA ranks add an adapter of their rank to it. ``loads`` counts the loads
    (replies report it: the coordinator checks "once per process")."""

    def __init__(self) -> None:
        self.key, self.by_rank, self.loads = "", {}, 0

    def get(self, config: Config) -> AdapterModel:
        """The adapter model of ``config.adapter.r``, made the active one."""
        adapter = config.adapter.model_dump_json(exclude={"r"})
        key = "|".join((config.model.model_dump_json(), adapter, repr(config.data.labels)))
        rank = config.adapter.r
        if key != self.key or not self.by_rank:
            self.by_rank = {}  # a new run with another model: free the old one first
            self.by_rank[rank] = build_adapter_model(config, list(config.data.labels or []))
            self.key, self.loads = key, self.loads + 1
        elif rank not in self.by_rank:
            self.by_rank[rank] = with_rank(next(iter(self.by_rank.values())), config)
        model = self.by_rank[rank]
        model.activate()
        return model


SHARED_MODEL = SharedModel()


_PROCESS_TAG = secrets.token_hex(6)


def process_tag() -> str:
    """Identifies a client process across messages (for the base-model load count).

    A random token drawn once per process: it says which replies came from one process
    and nothing about the machine (no host name, no pid) in what the coordinator stores.
    """
    return _PROCESS_TAG


@dataclass
class ClientJob:
    config: Config
    name: str
    state_dir: Path
    model: AdapterModel
    train: ExampleSet
    holdout: ExampleSet
    initial: dict[str, torch.Tensor]
    mode: str = "backprop"  # the trainer this client uses: backprop or zo

    @classmethod
    def for_context(cls, context: Context) -> ClientJob:
        """The job of this node: a simulated partition, or an agent's own data file."""
        text = str(context.run_config["fedtune-config"])
        node = context.node_config
        if "data-path" in node:
            key = (
                text,
                str(node["data-path"]),
                str(node.get("name", "")),
                str(node.get("state-dir", "")),
                str(node.get("device", "")),
                str(node.get("mode", "")),
                float(node.get("memory-budget-mb", 0.0)),
                int(node.get("rank", 0)),
            )
        else:
            partition = f"partition-{int(node['partition-id'])}"
            key = (text, partition, "", str(context.run_config["run-dir"]), "", "", 0.0, 0)
        job = _job(*key)
        job.model.activate()  # the process may serve clients of other ranks in between
        return job

    @property
    def rank(self) -> int:
        return self.config.adapter.r

    def fit_rank(self, plan: ParameterPlan, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """RECEIVED at this client's rank: cut (or refused, when the strategy trains one shared rank)."""
        sent_rank = rank_of(received)
        if sent_rank is None or sent_rank == self.rank:
            return received
        if not plan.per_client_ranks:
            raise UserError(
                f"rank {self.rank}: this run trains every client at rank {sent_rank}; "
                f"clients may have ranks of their own only with {', '.join(PER_CLIENT_RANK_STRATEGIES)}"
            )
        return resize(received, self.rank, self.config.adapter.alpha, self.config.adapter.rslora)

    def start_state(self, plan: ParameterPlan, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Seeded init, overlaid with this client's private tensors, then the global ones."""
        state = dict(self.initial)
        private = self.state_dir / PRIVATE_FILE
        if plan.private and private.is_file():
            stored = load_file(str(private))
            state.update({k: v for k, v in stored.items() if k in state and k in self.model.names(plan.private)})
        state.update(received)
        return state

    def load(self, plan: ParameterPlan, received: dict[str, torch.Tensor], content: RecordDict) -> None:
        """Set the model for this message: its adapter tensors (``start_state``) and the base residual the
        message carries (FLoRA, FedEx-LoRA), or the base as loaded when it carries none: the process's
        model may have served another run in between."""
        residual = {}
        if wire.RESIDUAL_ARRAYS in content.array_records:
            expected = {name: tuple(weight.shape) for name, weight in self.model.residual_layers().items()}
            residual = wire.decode_residual(content, expected)
        self.model.set_base_residual(residual)
        self.model.load_state(self.start_state(plan, received))

    def probes_head(self, plan: ParameterPlan, round_number: int) -> bool:
        """Whether this round is a head probe (engine/trainers/probe.py): a ZO client's first round,
        when the plan trains and shares a head at one rank that is one linear layer with a bias (BERT's
        classifier; not RoBERTa's two-layer head, nor a bias-free ``score``), with ``client.zo_head: probe``."""
        if self.mode != "zo" or round_number != 1 or self.config.client.zo_head != "probe" or plan.per_client_ranks:
            return False  # decided before can_probe walks the model: most messages are not probes
        return "head" in plan.trained and "head" in plan.sent and can_probe(self.model)

    def save_private(self, plan: ParameterPlan) -> None:
        if not plan.private:
            return
        with staged_file(self.state_dir / PRIVATE_FILE) as staging:
            save_file({k: v.contiguous() for k, v in self.model.state(plan.private).items()}, str(staging))

    def frozen_checksum(self, plan: ParameterPlan) -> str:
        return checksum(self.model.state(plan.frozen)) if plan.frozen else ""

    def rng(self, round_number: int) -> random.Random:
        return random.Random(f"{self.config.seed}:{self.name}:{round_number}")


def simulated_mode(config: Config, partition_id: int) -> str:
    """A simulated client's mode: ZO when ``client.zo_clients`` names it, else ``client.mode``.

    A fraction picks that share of the clients at random, seeded by the run's seed.
    """
    chosen = config.client.zo_clients
    if isinstance(chosen, float):
        count = round(chosen * config.federation.clients)
        chosen = random.Random(f"{config.seed}:zo-clients").sample(range(config.federation.clients), count)
    return "zo" if chosen is not None and partition_id in chosen else config.client.mode


def resolve_mode(mode: str, model: AdapterModel, train: ExampleSet, config: Config, budget_mb: float, name: str) -> str:
    """``auto`` becomes backprop or zo by the estimated step memory against the budget, said aloud."""
    if mode != "auto":
        return mode
    from fedtune.engine.memory import MB, choose_mode, default_budget, estimate

    budget = int(budget_mb * MB) if budget_mb else default_budget(model.device)
    chosen, reason = choose_mode(estimate(model, train, config.client), budget)
    print(f"fedtune: {name}: auto mode: {reason}", flush=True)
    return chosen


@functools.lru_cache(maxsize=64)
def _job(
    config_text: str, data: str, name: str, location: str, device: str, mode: str, budget_mb: float, rank: int
) -> ClientJob:
    config = parse_config(config_text)
    if device:  # an agent's --device overrides the coordinator's model.device
        config = config.model_copy(update={"model": config.model.model_copy(update={"device": device})})
    partition_id = int(data.removeprefix("partition-")) if data.startswith("partition-") else None
    if partition_id is not None and config.client.ranks:  # client.ranks, cycled over the simulated clients
        rank = config.client.ranks[partition_id % len(config.client.ranks)]
    if rank > config.adapter.r:
        raise UserError(f"--rank {rank}: above this run's adapter.r ({config.adapter.r}), the largest rank a client may use")
    if rank > 0 and rank != config.adapter.r:  # this client's rank (an agent's --rank)
        config = _at_rank(config, rank)
    model = SHARED_MODEL.get(config)
    spec = TaskSpec.from_config(config)
    if partition_id is not None:
        from fedtune.engine.partition import client_rows

        name = f"client-{partition_id}"
        mode = simulated_mode(config, partition_id)
        train_rows, held_rows = client_rows(config, partition_id)
        state_dir = RunDir(Path(location)).client_dir(name)
        source = f"{config.data.train} (partition {partition_id})"
    else:
        rows = list(read_records(data))
        name = name or Path(data).stem
        train_rows, held_rows = holdout_split(rows, config.data.holdout, seed=f"{config.seed}:{name}")
        if not location:
            raise UserError("client state dir: not set (fedtune client --state-dir DIR)")
        state_dir = Path(location) / str(config.output.name) / name
        source = data
        mode = mode or config.client.mode  # an agent's --mode overrides client.mode
    train = encode(train_rows, spec, model.tokenizer, source)
    mode = resolve_mode(mode, model, train, config, budget_mb, name)
    if rank == RANK_AUTO:
        config = _at_rank(config, auto_rank(mode, model, train, config, budget_mb, name))
        model = SHARED_MODEL.get(config)
    return ClientJob(
        config=config,
        name=name,
        state_dir=state_dir,
        model=model,
        train=train,
        holdout=encode(held_rows, spec, model.tokenizer, source),
        initial=initial_state(model.model, config.seed, model.params),
        mode=mode,
    )


def _at_rank(config: Config, rank: int) -> Config:
    return config.model_copy(update={"adapter": config.adapter.model_copy(update={"r": rank})})


def auto_rank(mode: str, model: AdapterModel, train: ExampleSet, config: Config, budget_mb: float, name: str) -> int:
    """An agent's ``--rank auto``: the largest power of two up to ``adapter.r`` whose backprop step fits the
    budget, estimated once at ``adapter.r`` (engine/memory.py); a ZO step's memory hardly depends on the rank.
    The mode is settled first (``--mode auto`` judges backprop at ``adapter.r``)."""
    from fedtune.engine.memory import MB, choose_rank, default_budget, estimate, rank_bytes

    if config.strategy.name not in PER_CLIENT_RANK_STRATEGIES:
        rank, reason = config.adapter.r, f"rank {config.adapter.r}: strategy {config.strategy.name} trains every client at one rank"
    elif mode == "zo":
        rank, reason = config.adapter.r, f"rank {config.adapter.r}: a zo step's memory hardly depends on the rank"
    else:
        budget = int(budget_mb * MB) if budget_mb else default_budget(model.device)
        footprint = estimate(model, train, config.client)
        rank, reason = choose_rank(footprint, config.adapter.r, rank_bytes(model, train, config.client), budget)
    print(f"fedtune: {name}: auto rank: {reason}", flush=True)
    return rank
