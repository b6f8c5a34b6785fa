"""Before round 1: is this DP configuration likely to learn anything at all?

core/dp_accounting.py estimates one step's noise against the most signal it can carry
(``noise_to_signal``). The coordinator knows everything that estimate needs for client-level
DP (σ, the sent coordinates, the expected clients per round). For sample-level DP each
client's σ depends on its own number of examples: in a simulation the coordinator computes
the partitions and judges the median client (its size, and its per-example gradient norms
against ``privacy.max_grad_norm``); a deployed agent judges itself when it first trains
(client/client_app.py).
"""

from __future__ import annotations

import random

from fedtune.core.config import Config
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import TaskSpec, encode
from fedtune.engine.partition import client_rows
from fedtune.engine.trainers import DPSGDTrainer
from fedtune.engine.trainers.dpsgd import CLIP_PROBE_EXAMPLES
from fedtune.strategies import ClientLevelDP, LoraStrategy


def privacy_warnings(config: Config, strategy: LoraStrategy | ClientLevelDP, model: AdapterModel, simulated: bool) -> list[str]:
    """The run's DP preflight before round 1 (lines to print), from whoever owns the mechanism."""
    if isinstance(strategy, ClientLevelDP):  # client level: the wrapper's own check
        return strategy.preflight(model.state())
    if config.privacy.mode != "sample" or not simulated:
        return []
    sizes = {index: len(client_rows(config, index)[0]) for index in range(config.federation.clients)}
    median = sorted(sizes, key=sizes.__getitem__)[len(sizes) // 2]
    examples = sizes[median]
    if examples == 0:
        return []  # the partitioner's own checks say what is wrong with empty partitions
    name = f"client-{median}"
    trainer = DPSGDTrainer.for_client(config, None, examples, name, 1, config.client.local_steps)
    params = model.trainable(strategy.plan.trained)
    warnings = []
    if warning := trainer.utility_warning(sum(param.numel() for param in params.values()), examples):
        warnings.append(f"{warning} (the median client, {examples} examples)")
    rows = client_rows(config, median)[0]
    rows = random.Random(0).sample(rows, min(CLIP_PROBE_EXAMPLES, len(rows)))  # tokenize only what is measured
    data = encode(rows, TaskSpec.from_config(config), model.tokenizer, "the median client")
    if warning := trainer.clip_warning(model, params, data, config.client, f"{name}'s (the median client)"):
        warnings.append(warning)
    return warnings
