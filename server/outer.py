"""Outer optimizers: what the server does with one flush's averaged pseudo-gradient g.

g = mean Δ = θ_base − θ_local points uphill, like a gradient, so every rule steps θ −= lr · (...):
- ``fedavg``: θ −= lr · g (lr 1 = plain FedAvg: the weighted mean of the client models).
- ``nesterov``: DiLoCo's outer SGD with Nesterov momentum, as torch.optim.SGD(nesterov=True)
  writes it: m = μ m + g; θ −= lr (g + μ m). Called once per flush, so the momentum moves once
  per K arrivals ("delayed Nesterov", Async Local-SGD) rather than once per update.
- ``fedadam``: Reddi et al. (2021): m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²;
  θ −= lr m / (√v + ε), without bias correction; ε is their adaptivity τ.

Each rule acts only on covered elements (``mask``): elsewhere θ and the optimizer state keep
their values, as HeteroFL/FjORD require for elements no client trained.
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
def outer_step(config: OuterConfig, name: str, theta: torch.Tensor, g: torch.Tensor,
               mask: torch.Tensor | None, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The new value of tensor ``name`` (a fresh tensor: the old one may live on in the version
    history). ``mask`` broadcasts over ``theta`` and marks covered elements; None = all covered.
    The state tensors are updated in place."""
    if config.kind == "fedavg":
        step = g * config.lr
    elif config.kind == "nesterov":
        m = state[f"m/{name}"]
        m_new = m * config.momentum + g
        step = (g + m_new * config.momentum) * config.lr
        m.copy_(m_new if mask is None else torch.where(mask, m_new, m))
    else:
        m, v = state[f"m/{name}"], state[f"v/{name}"]
        b1, b2 = config.betas
        m_new = m * b1 + g * (1 - b1)
        v_new = v * b2 + g * g * (1 - b2)
        step = m_new / (v_new.sqrt() + config.eps) * config.lr
        m.copy_(m_new if mask is None else torch.where(mask, m_new, m))
        v.copy_(v_new if mask is None else torch.where(mask, v_new, v))
    return theta - step if mask is None else torch.where(mask, theta - step, theta)
