"""LoRA-FAIR (Bian et al., ICCV 2025): a server-side correction of the averaged B.

FedIT's B̄Ā is not the average of the clients' products ΔW = Σ_k p_k B_k A_k. LoRA-FAIR
keeps Ā and finds a residual ΔB for B̄ minimising

    f(ΔB) = 1 − cos(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖_F          (λ = 0.01 by default)

then broadcasts Ā and B̄ + ΔB as every client's starting point for the next round.

Solver. Everything the objective needs lives in the rank-r space, so ΔW (d_out × d_in)
is never formed: with B' = B̄ + ΔB,
    ⟨ΔW, B'Ā⟩ = ⟨G, B'⟩,      G = Σ_k p_k B_k (A_k Āᵀ)              (d_out × r)
    ‖B'Ā‖²    = ⟨B' S, B'⟩,   S = Ā Āᵀ                               (r × r)
    ‖ΔW‖²     = Σ_{k,l} p_k p_l ⟨B_kᵀ B_l, A_k A_lᵀ⟩                  (r × r each)
Modules with equal shapes are stacked and solved together. ΔB is parametrised as
s·U with s the RMS of B̄ (per module), so one step size fits every module whatever the
scale of its weights; U starts at 0 and Adam (step 0.05) runs at most 200 steps,
stopping once the summed objective improves by less than 1e-7 (relative) over 10
steps. Cost per step: O(d_out · r²) per module; the setup is O(K² · r² · (d_in + d_out))
per module. For SmolLM2-135M (120 modules, r = 8, 10 clients) the whole aggregation
takes well under a second on 2 CPU cores (benchmarks/fair_aggregation.py).

Under client-level DP the server may only use what the mechanism releases, so each client
releases its update together with each module's B_k A_k − B₀A₀, clipped as one vector and
noised as one (strategies/client_dp.py); Ā, B̄ and ΔW come from that noised mean and the
correction is post-processing, covered by the same ε.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field

from fedtune.core.config import Config, Section
from fedtune.core.plan import ROLES, ParameterPlan, role_of
from fedtune.strategies.base import LoraStrategy
from fedtune.strategies.robust import aggregate_tensors, weighted_mean
from fedtune.strategies.updates import ClientUpdate, Tensors


class FairSettings(Section):
    """``strategy.fair``: LoRA-FAIR's correction solver."""

    regularization: float = Field(0.01, ge=0.0)  # λ on ‖ΔB‖
    max_steps: int = Field(200, ge=1)


@dataclass(frozen=True)
class SolverSettings:
    lam: float = 0.01
    max_steps: int = 200
    step_size: float = 0.05
    tolerance: float = 1e-7
    patience: int = 10


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every LoRA-adapted module."""
    return [(a, a.replace(".lora_A.", ".lora_B.")) for a in names if ".lora_A." in a]


def fair_correction(
    a_clients: list[torch.Tensor],  # K tensors (L, r, d_in)
    b_clients: list[torch.Tensor],  # K tensors (L, d_out, r)
    weights: torch.Tensor,  # (K,) summing to 1
    settings: SolverSettings = SolverSettings(),
    means: tuple[torch.Tensor, torch.Tensor] | None = None,  # (Ā, B̄) to use instead of the weighted means
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ā, B̄ + ΔB, ΔB) for a stack of L same-shaped modules.

    ΔW = Σ_k p_k B_k A_k always uses ``weights``; Ā and B̄ are their weighted means unless
    ``means`` gives them (``strategy.robust: trimmed-mean`` / ``median``: coordinate-wise
    statistics, with ΔW over the bounded clients).
    """
    a = torch.stack(a_clients).double()  # (K, L, r, d_in)
    b = torch.stack(b_clients).double()  # (K, L, d_out, r)
    p = weights.double().view(-1, 1, 1, 1)
    if means is None:
        a_bar, b_bar = (p * a).sum(0), (p * b).sum(0)
    else:
        a_bar, b_bar = (m.double() for m in means)
    g = (p * b @ (a @ a_bar.transpose(-1, -2))).sum(0)  # (L, d_out, r)
    cross_a = torch.einsum("kmri,lmsi->klmrs", a, a)  # A_k A_lᵀ
    cross_b = torch.einsum("kmor,lmos->klmrs", b, b)  # B_kᵀ B_l
    pw = weights.double()
    norm_w = torch.einsum("k,l,klmrs,klmrs->m", pw, pw, cross_b, cross_a).clamp_min(1e-30).sqrt()  # (L,)
    b_new, delta = solve_correction(a_bar, b_bar, g, norm_w, settings)
    return a_bar.float(), b_new, delta


def solve_correction(
    a_bar: torch.Tensor,  # (L, r, d_in)
    b_bar: torch.Tensor,  # (L, d_out, r)
    g: torch.Tensor,  # (L, d_out, r): ΔW Āᵀ
    norm_w: torch.Tensor,  # (L,): ‖ΔW‖_F
    settings: SolverSettings = SolverSettings(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B̄ + ΔB, ΔB) minimising f; needs ΔW only through G = ΔW Āᵀ and ‖ΔW‖."""
    a_bar, b_bar = a_bar.double(), b_bar.double()
    s = a_bar @ a_bar.transpose(-1, -2)  # (L, r, r)
    scale = b_bar.pow(2).mean(dim=(-1, -2), keepdim=True).sqrt().clamp_min(1e-12)  # (L, 1, 1)
    # the sums above need float64; the iterations do not, and run 3x faster in float32
    g, s, norm_w, scale, b_bar32 = (t.float() for t in (g, s, norm_w, scale, b_bar))

    def objective(u: torch.Tensor) -> torch.Tensor:
        delta = scale * u
        b_new = b_bar32 + delta
        inner = (g * b_new).sum((-1, -2))
        norm_m = ((b_new @ s) * b_new).sum((-1, -2)).clamp_min(1e-30).sqrt()
        cos = inner / (norm_w * norm_m)
        return (1 - cos + settings.lam * delta.flatten(1).norm(dim=1)).sum()

    u = torch.zeros_like(b_bar32, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=settings.step_size)
    history: list[float] = []
    for _ in range(settings.max_steps):
        optimizer.zero_grad()
        loss = objective(u)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if len(history) > settings.patience:
            before = history[-settings.patience - 1]
            if before - history[-1] < settings.tolerance * abs(before):
                break
    delta = (scale * u).detach()
    return b_bar32 + delta, delta


def module_groups(names: list[str], tensors: Tensors) -> list[list[tuple[str, str]]]:
    """LoRA (A, B) name pairs grouped by shape, so each group is solved as one stack."""
    groups: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for a_name, b_name in lora_pairs(names):
        groups[(tuple(tensors[a_name].shape), tuple(tensors[b_name].shape))].append((a_name, b_name))
    return list(groups.values())


def fair_aggregate(
    updates: list[Tensors],
    weights: list[float],
    settings: SolverSettings = SolverSettings(),
    mean: Tensors | None = None,
) -> Tensors:
    """FedIT means for every tensor (or ``mean``, e.g. a coordinate-wise median), then B̄ + ΔB for
    each LoRA module (batched by shape), with ΔW the ``weights``-weighted mean of the clients' B_k·A_k.

    With a robust ``mean``, Ā and B̄ are robust statistics of A and B taken separately, not of the
    products: a heuristic (strategies/robust.py); the correction's target ΔW is the weighted mean
    of the bounded clients' products.
    """
    result = weighted_mean(updates, weights) if mean is None else dict(mean)
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    for pairs in module_groups(list(updates[0]), updates[0]):
        a_clients = [torch.stack([u[a] for a, _ in pairs]) for u in updates]
        b_clients = [torch.stack([u[b] for _, b in pairs]) for u in updates]
        means = None
        if mean is not None:
            means = (torch.stack([mean[a] for a, _ in pairs]), torch.stack([mean[b] for _, b in pairs]))
        _, b_new, _ = fair_correction(a_clients, b_clients, p, settings, means)
        for index, (_, b_name) in enumerate(pairs):
            result[b_name] = b_new[index]
    return result


def product_name(a_name: str) -> str:
    """Key of a module's B·A change in what FAIR releases under client-level DP (never on the wire)."""
    return a_name.replace(".lora_A.", ".lora_BA.")


class LoraFair(LoraStrategy):
    name = "fair"
    secure_refusal = "its correction needs each client's product B_k·A_k"
    plan = ParameterPlan(trained=frozenset(ROLES), sent=frozenset(ROLES))
    settings: ClassVar = FairSettings
    moved_keys: ClassVar = {"fair_lambda": "regularization", "fair_steps": "max_steps"}  # the old flat strategy keys

    def __init__(self, *args, solver: SolverSettings = SolverSettings(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.solver = solver

    @classmethod
    def from_config(cls, config: Config) -> LoraFair:
        section = cls.settings_of(config)
        solver = SolverSettings(lam=section.regularization, max_steps=section.max_steps)
        return cls(**cls.common_settings(config), solver=solver)

    @classmethod
    def released_coordinates(cls, tensors: Mapping[str, torch.Tensor]) -> int:
        """The sent tensors, plus each module's change of B·A (d_out × d_in) that FAIR's correction reads."""
        products = sum(
            tensor.shape[1] * tensors[name.replace(".lora_A.", ".lora_B.")].shape[0]
            for name, tensor in tensors.items()
            if role_of(name) == "lora_A"
        )
        return super().released_coordinates(tensors) + products

    def combine(self, current: Tensors, updates: list[ClientUpdate]) -> Tensors:
        """FAIR on the (bounded) clients; with ``strategy.robust: trimmed-mean`` / ``median`` Ā and B̄
        are that statistic (of A and B separately: a heuristic) and the correction runs from there."""
        tensors, weights = [u.tensors for u in updates], [u.num_examples for u in updates]
        mean = aggregate_tensors(tensors, weights, self.robust) if self.robust.coordinatewise else None
        return fair_aggregate(tensors, weights, self.solver, mean)

    # -- client-level DP: the correction must be post-processing of what the mechanism releases
    def released(self, update: ClientUpdate) -> Tensors:
        """The update, plus each module's B_k A_k − B₀A₀ (d_out × d_in), clipped together with it."""
        vector = super().released(update)
        start, mine = self.broadcast, update.tensors
        for a_name, b_name in lora_pairs(list(mine)):
            before = start[b_name].float() @ start[a_name].float()
            vector[product_name(a_name)] = mine[b_name] @ mine[a_name] - before
        return vector

    def combine_released(self, start: Tensors, mean: Tensors) -> Tensors:
        """Ā, B̄ from the noised mean update; ΔW = B₀A₀ + the noised mean product change; then B̄ + ΔB.

        Noise inflates ‖ΔW‖ (d_out·d_in noisy coordinates), which scales the cosine term down
        against λ‖ΔB‖: the heavier the noise, the smaller the correction.
        """
        result = super().combine_released(start, mean)  # the sent tensors; the products stay in `mean`
        for pairs in module_groups(list(start), start):
            a_bar = torch.stack([result[a] for a, _ in pairs]).double()
            b_bar = torch.stack([result[b] for _, b in pairs]).double()
            w_bar = torch.stack(
                [start[b].double() @ start[a].double() + mean[product_name(a)].double() for a, b in pairs]
            )
            g = w_bar @ a_bar.transpose(-1, -2)
            norm_w = w_bar.flatten(1).norm(dim=1).clamp_min(1e-30)
            b_new, _ = solve_correction(a_bar, b_bar, g, norm_w, self.solver)
            for index, (_, b_name) in enumerate(pairs):
                result[b_name] = b_new[index]
        return result
