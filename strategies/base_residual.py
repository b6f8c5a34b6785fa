"""What FLoRA and FedEx-LoRA share: exact aggregation by folding a residual into the frozen base.

What they add accumulates in a dense residual per LoRA layer (``core.plan.residual_name``), held
in the global state and checkpoints (``base_residual.safetensors``) and sent with every message,
so a client that missed rounds or restarted is current after one message. Always fp32 whatever
``federation.compression`` says: a rounded residual would make the clients' base differ from the
one the coordinator evaluates and checkpoints, and the aggregation no longer exact. It needs a
float base (``model.quantization: none``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedtune.core import wire
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.plan import RESIDUAL, role_of
from fedtune.strategies.per_client_rank import PerClientRankStrategy


class BaseResidualStrategy(PerClientRankStrategy):
    base_residual: ClassVar[bool] = True

    @classmethod
    def check_config(cls, config: Config) -> None:
        super().check_config(config)
        if config.model.quantization != "none":
            raise UserError(
                f"strategy.name {cls.name}: adds a residual to the frozen base weights, which needs a float base "
                f"(model.quantization none, not {config.model.quantization})"
            )

    def extra_records(self) -> dict[str, Any]:
        """The base residuals in the global state, uncompressed, for every message."""
        residual = {name: value for name, value in self.current.items() if role_of(name) == RESIDUAL}
        if not residual:
            return {}
        packed = wire.encode(residual, "none")
        return {wire.RESIDUAL_ARRAYS: packed["arrays"], wire.RESIDUAL_LAYOUT: packed["layout"]}
