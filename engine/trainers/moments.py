"""An optimizer's per-tensor state kept across rounds (``client.optimizer_state: kept``).

A client restarts its optimizer every round by default. With AdamW and few local steps
that makes each round's first steps sign-like (step 1 moves every coordinate by the
learning rate, whatever its gradient), which under DP-SGD's noise is mostly noise. Kept,
the moments carry on from the client's previous round (the global tensors they apply to
are new; the statistics of the client's gradients are not). On the SST-2 DP recipe at 2
local steps a round it did not help (BENCHMARKS.md, "The DP recipe in the federation").

The file lives in the client's state dir next to its private tensors and is read only by
the client. Under DP-SGD it is a function of noised gradients only (post-processing, no
privacy cost). A missing file, or a tensor whose shape no longer matches, starts fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune.core.atomic import staged_file
from fedtune.core.errors import UserError

MOMENTS_FILE = "optimizer.safetensors"


def restore(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], path: Path) -> int:
    """Load PATH's state into OPTIMIZER (made over ``PARAMS.values()``, in order) for the tensors it
    matches by name and shape; how many it matched. torch's ``load_state_dict`` places each value
    as the optimizer expects (device, dtype, AdamW's step on the CPU)."""
    if not path.is_file():
        return 0
    try:
        stored = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"{path}: unreadable optimizer state ({error}); delete it to start the optimizer afresh"
        ) from None
    current = optimizer.state_dict()
    for index, (name, param) in enumerate(params.items()):
        state = {key.partition("/")[2]: value for key, value in stored.items() if key.partition("/")[0] == name}
        if state and all(value.dim() == 0 or value.shape == param.shape for value in state.values()):
            current["state"][index] = state
    optimizer.load_state_dict(current)
    return len(current["state"])


def keep(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], path: Path) -> None:
    """Write OPTIMIZER's tensor state for PARAMS to PATH (atomically: a crash leaves the last round's)."""
    state = optimizer.state_dict()["state"]
    tensors = {
        f"{name}/{key}": value.detach().to("cpu").contiguous()
        for index, name in enumerate(params)
        for key, value in state.get(index, {}).items()
        if isinstance(value, torch.Tensor)
    }
    if not tensors:  # SGD without momentum keeps nothing
        return
    with staged_file(path) as staging:
        save_file(tensors, str(staging))
