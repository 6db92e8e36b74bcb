"""Outer optimizers: what the server does with one flush's averaged pseudo-gradient g.

g = mean Δ = θ_base − θ_local points uphill, like a gradient, so every rule turns g into a
direction d and the aggregator steps θ −= lr · d:
- ``fedavg``: d = g (lr 1 = plain FedAvg: the weighted mean of the client models).
- ``nesterov``: DiLoCo's outer SGD with Nesterov momentum, op for op as torch.optim.SGD
  (nesterov=True) writes it: m = μ m + g; d = g + μ m. Called once per flush, so the momentum
  moves once per K arrivals ("delayed Nesterov", Async Local-SGD) rather than once per update.
- ``fedadam``: Reddi et al. (2021): m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²;
  d = m / (√v + ε), without bias correction; ε is their adaptivity τ.

The rules see only covered elements: the aggregator hands them views of the regions some
update covered, so elsewhere the optimizer state keeps its value, as HeteroFL/FjORD require
for elements no client trained. Everything happens in place on those views, so a flush makes
no temporary the size of a tensor (let alone of the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stamen.core.errors import UserError

STATE = {"fedavg": (), "nesterov": ("m",), "fedadam": ("m", "v")}


@dataclass(frozen=True)
class OuterConfig:
    kind: str = "nesterov"
    lr: float = 0.7
    momentum: float = 0.9  # nesterov
    betas: tuple[float, float] = (0.9, 0.99)  # fedadam
    eps: float = 1e-3  # fedadam

    def __post_init__(self) -> None:
        if self.kind not in STATE:
            raise UserError(f"unknown outer optimizer {self.kind!r}: use one of {', '.join(STATE)}")
        if not self.lr > 0:
            raise UserError(f"outer lr must be positive, got {self.lr}")


def init_state(config: OuterConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeroed optimizer state, flat: ``"m/<tensor name>"`` etc. (flat so it checkpoints as is)."""
    return {f"{k}/{n}": torch.zeros_like(w) for k in STATE[config.kind] for n, w in weights.items()}


@torch.no_grad()
def direction_(config: OuterConfig, g: list[torch.Tensor], state: dict[str, list[torch.Tensor]]) -> None:
    """Overwrite ``g`` with the step direction d and advance the optimizer state, in place.
    ``g`` and each ``state[k]`` (k in ``STATE[config.kind]``) are parallel lists of views of
    the covered regions; the caller then applies θ −= lr · d."""
    if config.kind == "nesterov":
        m = state["m"]
        torch._foreach_mul_(m, config.momentum)
        torch._foreach_add_(m, g)
        torch._foreach_add_(g, m, alpha=config.momentum)
    elif config.kind == "fedadam":
        (b1, b2), m, v = config.betas, state["m"], state["v"]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        torch._foreach_copy_(g, v)  # g is spent: it now holds √v + ε, then m / (√v + ε)
        torch._foreach_sqrt_(g)
        torch._foreach_add_(g, config.eps)
        for mi, gi in zip(m, g):
            torch.div(mi, gi, out=gi)
