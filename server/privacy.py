"""Central differential privacy for the asynchronous buffer (DP-FedBuff, Huba et al. 2022):
every update is clipped to norm C and weighs 1, and each flush adds Gaussian noise of standard
deviation σ·C to the buffer's sum S on the elements it covered before g = S / W. One device's
update then changes S by at most C, so each flush is a Gaussian mechanism with noise
multiplier σ on every device's contribution.

Accounting is device-level and assumes nothing about sampling: any device may be in every
flush, so T flushes compose T Gaussian mechanisms (no amplification by subsampling is
claimed, which would need a sampling the server does not control). The privacy spent, ε at
the configured δ, comes from Opacus's RDP accountant (``opacus.accountants.analysis.rdp``),
not from arithmetic written here; ``budget`` stops training once the next flush would spend
more than it.

What it does not cover: which elements a flush covered (a device's tier, so its plan, is
visible in the coverage pattern), the tokens and losses clients report, and an operator who
reads updates before they are noised (no secure aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stamen.core.errors import UserError

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]  # Opacus's defaults


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = False
    clip: float = 1.0  # C: every update's norm is clipped to this
    noise_multiplier: float = 1.0  # σ: noise standard deviation σ·C per element of a flush's sum
    delta: float = 1e-5  # δ of the (ε, δ) reported
    budget: float = 0.0  # stop training once ε would exceed this (0: never stop)
    seed: int | None = None  # the noise's seed; None: a secret one drawn at the federation's start

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.noise_multiplier > 0 and 0 < self.delta < 1 and self.budget >= 0):
            raise UserError("[privacy] clip and noise_multiplier must be positive, delta in (0, 1), budget >= 0")


def epsilon(noise_multiplier: float, flushes: int, delta: float) -> float:
    """ε at δ after ``flushes`` Gaussian mechanisms of this noise multiplier (each device in
    every one of them: sample rate 1)."""
    if flushes == 0:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # imported when DP is on

    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=flushes, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def add_noise_(S: list[torch.Tensor], config: PrivacyConfig, generator: torch.Generator) -> None:
    """Gaussian noise of standard deviation σ·C added to each covered region of S, in place."""
    std = config.noise_multiplier * config.clip
    for s in S:
        s.add_(torch.randn(s.shape, generator=generator, dtype=s.dtype), alpha=std)
