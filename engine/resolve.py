"""Turning a validated config into a fully resolved one before a run starts.

Resolution fills every default that depends on the model or the data (target
modules, token budget, label set, run name) and checks the rules that span sections.
The resolved config is what ``config.yaml`` in the run directory records and what
every client receives, so all parties agree on it.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.config import BASE_RESIDUAL_STRATEGIES, PER_CLIENT_RANK_STRATEGIES, Config
from fedtune.errors import UserError


def resolve(config: Config, *, name_hint: str, need_train_data: bool) -> Config:
    from fedtune.engine.base_model import default_max_length, default_target_modules, unmatched_target_modules
    from fedtune.engine.data import infer_labels

    config = config.model_copy(deep=True)
    fed = config.federation
    if fed.min_clients > fed.clients:
        raise UserError(f"federation.min_clients: {fed.min_clients} exceeds federation.clients ({fed.clients})")
    zo_clients = config.client.zo_clients
    if isinstance(zo_clients, list) and any(i >= fed.clients for i in zo_clients):
        raise UserError(f"client.zo_clients: {zo_clients} names clients beyond 0..{fed.clients - 1}")
    check_privacy(config)
    check_ranks(config)
    if config.model.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("model.device cuda: this machine has no CUDA device torch can use; set auto or cpu")
    if need_train_data and not config.data.train:
        raise UserError("data.train: required for this command (a data file, synthetic:NAME/SPLIT or hf:NAME)")
    if config.data.server_holdout and config.data.eval:
        raise UserError("data.server_holdout: set either data.eval or data.server_holdout, not both")
    if config.data.partition.kind == "field" and not config.data.partition.field:
        raise UserError("data.partition.field: required when data.partition.kind is field (e.g. domain)")
    if config.adapter.target_modules is None:
        config.adapter.target_modules = default_target_modules(config.model.name)
    unmatched, available = unmatched_target_modules(config.model.name, config.adapter.target_modules)
    if unmatched:
        raise UserError(
            f"adapter.target_modules: {unmatched} match no layer of {config.model.name}; "
            f"layers that can take LoRA: {', '.join(available)}"
        )
    if config.model.max_length is None:
        config.model.max_length = default_max_length(config.model.name)
    wants_labels = config.model.task == "classification" or config.data.label_words
    if wants_labels and not config.data.labels:
        if config.data.label_words:
            config.data.labels = list(config.data.label_words)
        else:
            sources = [s for s in (config.data.train, config.data.eval) if s]
            if not sources:
                raise UserError("data.labels: required when neither data.train nor data.eval is given")
            config.data.labels = infer_labels(sources, config.data.label_field)
    if config.data.label_words:
        missing = [label for label in config.data.labels if label not in config.data.label_words]
        if missing:
            raise UserError(f"data.label_words: no word for labels {missing}")
    if config.model.task == "classification" and len(config.data.labels) < 2:
        raise UserError(f"data.labels: classification needs at least 2 labels (got {config.data.labels})")
    if config.output.name is None:
        config.output.name = f"{name_hint}-{time.strftime('%Y%m%d-%H%M%S')}"
    config.output.dir = str(Path(config.output.dir).resolve())
    return config


def check_privacy(config: Config) -> None:
    """Combinations a DP run cannot honour, refused before anything trains."""
    privacy, client = config.privacy, config.client
    if privacy.mode == "none":
        return
    if privacy.noise_multiplier is None and privacy.target_epsilon is None:
        raise UserError(f"privacy.mode {privacy.mode}: set privacy.noise_multiplier, privacy.target_epsilon or both")
    if privacy.mode == "sample":
        if client.mode != "backprop" or client.zo_clients:
            raise UserError(
                "privacy.mode sample: DP-SGD needs backprop clients (client.mode backprop, no client.zo_clients); "
                "zeroth-order clients can use privacy.mode client"
            )
        if client.grad_accum != 1:
            raise UserError("privacy.mode sample: client.grad_accum must be 1 (the Poisson batch is client.batch_size)")
    if privacy.mode == "client" and config.strategy.robust in ("trimmed-mean", "median"):
        raise UserError(
            f"strategy.robust {config.strategy.robust}: not with privacy.mode client (its clip to privacy.clip_norm "
            "and equal weights already bound each client, and a statistic across clients would break DP-FedAvg's "
            "sensitivity bound); use strategy.robust norm-bound (a no-op under client-level DP) or none"
        )


def check_ranks(config: Config) -> None:
    """Per-client ranks: only with a strategy that combines them, each at most adapter.r, and not with
    what needs one shared rank (client-level DP's common broadcast, coordinate-wise statistics, seed replay)."""
    ranks, name = config.client.ranks, config.strategy.name
    allowed = ", ".join(PER_CLIENT_RANK_STRATEGIES)
    if ranks and name not in PER_CLIENT_RANK_STRATEGIES:
        raise UserError(f"client.ranks: strategy {name} trains every client at one rank; per-client ranks need {allowed}")
    if ranks and max(ranks) > config.adapter.r:
        raise UserError(f"client.ranks: {max(ranks)} exceeds adapter.r ({config.adapter.r}), the global rank")
    if name not in PER_CLIENT_RANK_STRATEGIES:
        return
    if name in BASE_RESIDUAL_STRATEGIES and config.model.quantization != "none":
        raise UserError(
            f"strategy.name {name}: adds a residual to the frozen base weights, which needs a float base "
            f"(model.quantization none, not {config.model.quantization})"
        )
    if config.privacy.mode == "client":
        raise UserError(f"strategy.name {name}: not with privacy.mode client yet (clients start from different broadcasts)")
    if config.strategy.robust in ("trimmed-mean", "median"):
        raise UserError(f"strategy.robust {config.strategy.robust}: not with {name}, whose factors differ in rank; use norm-bound or none")
    if config.client.zo_upload == "seeds":  # whatever client.mode says: an agent's --mode zo would upload seeds
        raise UserError(f"client.zo_upload seeds: not with {name} (the coordinator replays seeds from one broadcast); use delta")
