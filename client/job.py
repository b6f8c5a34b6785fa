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

from fedtune.core import wire
from fedtune.core.atomic import staged_file
from fedtune.core.config import Config, parse_config_text
from fedtune.core.errors import UserError
from fedtune.core.plan import ParameterPlan, checksum
from fedtune.core.ranks import LoraScale, rank_of, resize
from fedtune.core.records import read_records
from fedtune.core.rundir import RunDir
from fedtune.engine.adapters import AdapterModel, build_adapter_model, initial_state, with_rank
from fedtune.engine.checkpoint import PRIVATE_FILE
from fedtune.engine.data import ExampleSet, TaskSpec, encode, holdout_split
from fedtune.engine.trainers.probe import can_probe
from fedtune.strategies import strategy_class

parse_config = functools.lru_cache(maxsize=4)(parse_config_text)


class SharedModel:
    """The process's adapter model, one per model definition, so the base model loads once;
    clients of other LoRA ranks add an adapter of their rank to it. ``loads`` counts the loads
    (replies report it: the coordinator checks "once per process")."""

    def __init__(self) -> None:
        self.key, self.by_rank, self.loads = "", {}, 0

    def get(self, config: Config, rank: int) -> AdapterModel:
        """The adapter model at RANK, made the active one."""
        adapter = config.adapter.model_dump_json(exclude={"r"})
        key = "|".join((config.model.model_dump_json(), adapter, repr(config.data.labels)))
        if key != self.key or not self.by_rank:
            self.by_rank = {}  # a new run with another model: free the old one first
            self.by_rank[rank] = build_adapter_model(config, list(config.data.labels or []), rank)
            self.key, self.loads = key, self.loads + 1
        elif rank not in self.by_rank:
            self.by_rank[rank] = with_rank(next(iter(self.by_rank.values())), config, rank)
        model = self.by_rank[rank]
        model.activate()
        return model

    def forget(self) -> None:
        """Drop the loaded models, so the next ``get`` loads the base model again (benchmarks/reload_app)."""
        self.key, self.by_rank = "", {}


SHARED_MODEL = SharedModel()


_PROCESS_TAG = secrets.token_hex(6)


def process_tag() -> str:
    """Identifies a client process across messages (for the base-model load count).

    A random token drawn once per process: it says which replies came from one process
    and nothing about the machine (no host name, no pid) in what the coordinator stores.
    """
    return _PROCESS_TAG


RANK_AUTO = "auto"  # an agent's ``--rank auto``: the largest rank whose step fits its memory budget (engine/memory.py)


@dataclass(frozen=True)
class ClientKey:
    """Which client a ClientApp message is for: a process keeps one job per key (``job_of``)."""

    config_text: str  # the run's resolved config, as every party received it
    name: str  # an agent's own name ("": its data file's stem); a simulated client's is client-K
    state_dir: str  # where its private state lives
    partition: int | None = None  # a simulated client: its partition of data.train
    data_path: str | None = None  # an agent: its own data file
    device: str = ""  # an agent's --device ("": the run's model.device)
    mode: str = ""  # an agent's --mode ("": the run's client.mode)
    memory_budget_mb: float = 0.0  # for auto mode and auto rank (0: the memory available)
    rank: int | str | None = None  # an agent's --rank: a rank, RANK_AUTO, or None (the run's adapter.r)

    @classmethod
    def simulated(cls, context: Context) -> ClientKey:
        partition = int(context.node_config["partition-id"])
        run = RunDir(Path(str(context.run_config["run-dir"])))
        name = f"client-{partition}"
        return cls(str(context.run_config["fedtune-config"]), name, str(run.client_dir(name)), partition=partition)

    @classmethod
    def agent(cls, context: Context) -> ClientKey:
        """An agent's key from its SuperNode's node config (client/agent.py writes it)."""
        node = context.node_config
        rank = str(node.get("rank", ""))
        return cls(
            str(context.run_config["fedtune-config"]),
            name=str(node.get("name", "")),
            state_dir=str(node.get("state-dir", "")),
            data_path=str(node["data-path"]),
            device=str(node.get("device", "")),
            mode=str(node.get("mode", "")),
            memory_budget_mb=float(node.get("memory-budget-mb", 0.0)),
            rank=int(rank) if rank.isdigit() else rank or None,
        )

    @classmethod
    def of(cls, context: Context) -> ClientKey:
        return cls.agent(context) if "data-path" in context.node_config else cls.simulated(context)


@dataclass
class ClientJob:
    config: Config  # the run's config (adapter.r is the run's global rank R)
    name: str
    state_dir: Path
    model: AdapterModel
    train: ExampleSet
    holdout: ExampleSet
    initial: dict[str, torch.Tensor]
    rank: int  # this client's LoRA rank (at most R)
    mode: str = "backprop"  # the trainer this client uses: backprop or zo

    @classmethod
    def for_context(cls, context: Context) -> ClientJob:
        """The job of this node: a simulated partition, or an agent's own data file."""
        job = job_of(ClientKey.of(context))
        job.model.activate()  # the process may serve clients of other ranks in between
        return job

    def fit_rank(self, plan: ParameterPlan, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """RECEIVED at this client's rank: cut (or refused, when the strategy trains one shared rank)."""
        sent_rank = rank_of(received)
        if sent_rank is None or sent_rank == self.rank:
            return received
        if not plan.per_client_ranks:
            raise UserError(
                f"rank {self.rank}: this run trains every client at rank {sent_rank}; clients may have ranks "
                "of their own only with a strategy that takes per-client ranks (README's strategy table)"
            )
        return resize(received, self.rank, LoraScale.of(self.config.adapter))

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
def job_of(key: ClientKey) -> ClientJob:
    """The job of KEY: the run's config, the client's data encoded once, its model at its rank."""
    config = parse_config(key.config_text)
    if key.device:  # an agent's --device overrides the coordinator's model.device
        config = config.model_copy(update={"model": config.model.model_copy(update={"device": key.device})})
    rank = key.rank if key.rank is not None else config.adapter.r
    if key.partition is not None and config.client.ranks:  # client.ranks, cycled over the simulated clients
        rank = config.client.ranks[key.partition % len(config.client.ranks)]
    if isinstance(rank, int) and rank > config.adapter.r:
        raise UserError(f"--rank {rank}: above this run's adapter.r ({config.adapter.r}), the largest rank a client may use")
    model = SHARED_MODEL.get(config, rank if isinstance(rank, int) else config.adapter.r)
    spec = TaskSpec.from_config(config)
    if key.partition is not None:
        from fedtune.engine.partition import client_rows

        name, mode = key.name, simulated_mode(config, key.partition)
        train_rows, held_rows = client_rows(config, key.partition)
        state_dir = Path(key.state_dir)
        source = f"{config.data.train} (partition {key.partition})"
    else:
        rows = list(read_records(key.data_path))
        name = key.name or Path(key.data_path).stem
        train_rows, held_rows = holdout_split(rows, config.data.holdout, seed=f"{config.seed}:{name}")
        if not key.state_dir:
            raise UserError("client state dir: not set (fedtune client --state-dir DIR)")
        state_dir = Path(key.state_dir) / str(config.output.name) / name
        source, mode = key.data_path, key.mode or config.client.mode  # an agent's --mode overrides client.mode
    train = encode(train_rows, spec, model.tokenizer, source)
    mode = resolve_mode(mode, model, train, config, key.memory_budget_mb, name)
    if rank == RANK_AUTO:
        rank = auto_rank(mode, model, train, config, key.memory_budget_mb, name)
        model = SHARED_MODEL.get(config, rank)
    return ClientJob(
        config=config,
        name=name,
        state_dir=state_dir,
        model=model,
        train=train,
        holdout=encode(held_rows, spec, model.tokenizer, source),
        initial=initial_state(model.model, config.seed, model.params),
        rank=rank,
        mode=mode,
    )


def auto_rank(mode: str, model: AdapterModel, train: ExampleSet, config: Config, budget_mb: float, name: str) -> int:
    """An agent's ``--rank auto``: the largest power of two up to ``adapter.r`` whose backprop step fits the
    budget, estimated once at ``adapter.r`` (engine/memory.py); a ZO step's memory hardly depends on the rank.
    The mode is settled first (``--mode auto`` judges backprop at ``adapter.r``)."""
    from fedtune.engine.memory import MB, choose_rank, default_budget, estimate, rank_bytes

    if not strategy_class(config).plan.per_client_ranks:
        rank, reason = config.adapter.r, f"rank {config.adapter.r}: strategy {config.strategy.name} trains every client at one rank"
    elif mode == "zo":
        rank, reason = config.adapter.r, f"rank {config.adapter.r}: a zo step's memory hardly depends on the rank"
    else:
        budget = int(budget_mb * MB) if budget_mb else default_budget(model.device)
        footprint = estimate(model, train, config.client)
        rank, reason = choose_rank(footprint, config.adapter.r, rank_bytes(model, train, config.client), budget)
    print(f"fedtune: {name}: auto rank: {reason}", flush=True)
    return rank
