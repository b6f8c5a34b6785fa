"""Turning a validated config into a fully resolved one before a run starts (the CLI's step before any command).

Resolution fills every default that depends on the model or the data (target
modules, token budget, label set, run name) and checks the rules that span sections.
The resolved config is what ``config.yaml`` in the run directory records and what
every client receives, so all parties agree on it.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.strategies import check_config, with_defaults


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
    check_config(config)  # the strategy's name, its section and its own checks
    with_defaults(config)
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
    fed = config.federation
    if privacy.mode == "client" and fed.fraction * fed.clients < fed.min_clients:
        raise UserError(
            f"federation.fraction: under privacy.mode client each client joins a round with probability "
            f"{fed.fraction:g}, so {fed.fraction * fed.clients:.2f} of {fed.clients} clients are expected per round, "
            f"fewer than federation.min_clients ({fed.min_clients}); raise federation.clients or federation.fraction "
            "(see README: client-level DP needs many clients per round)"
        )
    if privacy.mode == "client" and config.strategy.robust in ("trimmed-mean", "median"):
        raise UserError(
            f"strategy.robust {config.strategy.robust}: not with privacy.mode client (its clip to privacy.clip_norm "
            "and equal weights already bound each client, and a statistic across clients would break DP-FedAvg's "
            "sensitivity bound); use strategy.robust norm-bound (a no-op under client-level DP) or none"
        )
