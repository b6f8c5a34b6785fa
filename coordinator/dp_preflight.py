"""Before round 1: is this DP configuration likely to learn anything at all?

fedtune/dp_accounting.py estimates one step's noise against the most signal it can carry
(``noise_to_signal``). The coordinator knows everything that estimate needs for client-level
DP (σ, the sent coordinates, the expected clients per round). For sample-level DP each
client's σ depends on its own number of examples: in a simulation the coordinator computes
the partitions and judges the median client (its size, and its per-example gradient norms
against ``privacy.max_grad_norm``); a deployed agent judges itself when it first trains
(client/client_app.py).
"""

from __future__ import annotations

import random

from fedtune.config import Config
from fedtune.dp_accounting import clip_warning, utility_warning
from fedtune.engine.adapters import AdapterModel
from fedtune.engine.data import TaskSpec, encode, expected_batch_size
from fedtune.engine.partition import client_rows
from fedtune.engine.trainers import DPSGDTrainer
from fedtune.engine.trainers.dpsgd import CLIP_PROBE_EXAMPLES, per_example_grad_norms
from fedtune.plan import role_of
from fedtune.strategies import LoraStrategy


def privacy_warnings(config: Config, strategy: LoraStrategy, model: AdapterModel, simulated: bool) -> list[str]:
    tensors = model.state()

    def coordinates(roles: frozenset[str]) -> int:
        return sum(tensor.numel() for name, tensor in tensors.items() if role_of(name) in roles)

    if strategy.privacy is not None:  # client level
        dp, released = strategy.privacy, coordinates(strategy.plan.sent)
        if strategy.name == "fair":  # FAIR's release adds each module's change of B·A (d_out x d_in)
            released += sum(
                tensor.shape[1] * tensors[name.replace(".lora_A.", ".lora_B.")].shape[0]
                for name, tensor in tensors.items()
                if role_of(name) == "lora_A"
            )
        warning = utility_warning("client", dp.update_noise, released, dp.expected_clients)
        return [warning] if warning else []
    if config.privacy.mode != "sample" or not simulated:
        return []
    sizes = {index: len(client_rows(config, index)[0]) for index in range(config.federation.clients)}
    median = sorted(sizes, key=sizes.__getitem__)[len(sizes) // 2]
    examples = sizes[median]
    if examples == 0:
        return []  # the partitioner's own checks say what is wrong with empty partitions
    noise, rate = DPSGDTrainer.noise_for(config, examples, config.client.local_steps)
    warnings = []
    if warning := utility_warning("sample", noise, coordinates(strategy.plan.trained), expected_batch_size(rate, examples)):
        warnings.append(f"{warning} (the median client, {examples} examples)")
    rows = client_rows(config, median)[0]
    rows = random.Random(0).sample(rows, min(CLIP_PROBE_EXAMPLES, len(rows)))  # tokenize only what is measured
    data = encode(rows, TaskSpec.from_config(config), model.tokenizer, "the median client")
    norms = per_example_grad_norms(model, model.trainable(strategy.plan.trained), data, config.client, random.Random(0))
    if warning := clip_warning(config.privacy.max_grad_norm, norms, f"client-{median}'s (the median client)"):
        warnings.append(warning)
    return warnings
