"""LoRA-FAIR server aggregation time at SmolLM2-135M scale, beside FedIT's plain mean.

Adapters have the real shapes of smollm2-135m with LoRA r=8 on q/k/v/o (120 modules,
30 layers). Each of 10 clients' tensors = the seeded init plus a client-specific
random update. Timed: the full ``aggregate_train`` (decoding Flower reply messages,
checks, combine) and the combine step alone, median of 5 runs each.

    python benchmarks/fair_aggregation.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedtune.cli.resolve import resolve
from fedtune.core.config import Config
from fedtune.engine.adapters import build_adapter_model
from fedtune.strategies.fair import LoraFair
from fedtune.strategies.fedit import FedIT
from fedtune.strategies.updates import ClientUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from flower_helpers import StaticGrid, enter_run, reply  # noqa: E402

CLIENTS = 10


def main() -> None:
    torch.set_num_threads(2)
    config = resolve(
        Config.model_validate(
            {
                "model": {"name": "smollm2-135m", "task": "causal-lm"},
                "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            }
        ),
        name_hint="bench",
        need_train_data=False,
    )
    model = build_adapter_model(config, [])
    init = model.state()
    generator = torch.Generator().manual_seed(0)
    clients = [
        {name: value + 0.01 * torch.randn(value.shape, generator=generator) for name, value in init.items()}
        for _ in range(CLIENTS)
    ]
    modules = sum(".lora_A." in name for name in init)
    enter_run()
    results = {
        "modules": modules,
        "clients": CLIENTS,
        "rank": 8,
        "parameters_per_client": sum(v.numel() for v in init.values()),
    }
    for strategy_type in (FedIT, LoraFair):
        full, combine = [], []
        for _ in range(5):
            strategy = strategy_type(fraction=1.0, min_clients=2)
            messages = list(
                strategy.configure_train(1, ArrayRecord(init), ConfigRecord(), StaticGrid(list(range(CLIENTS))))
            )
            replies = [reply(m, c, num_examples=100 + i) for i, (m, c) in enumerate(zip(messages, clients))]
            started = time.perf_counter()
            strategy.aggregate_train(1, replies)
            full.append(time.perf_counter() - started)
            updates = [ClientUpdate(i, str(i), c, 100 + i, {}) for i, c in enumerate(clients)]
            started = time.perf_counter()
            strategy.combine(init, updates)
            combine.append(time.perf_counter() - started)
        results[strategy_type.__name__] = {
            "aggregate_train_s": round(statistics.median(full), 3),
            "combine_s": round(statistics.median(combine), 3),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
