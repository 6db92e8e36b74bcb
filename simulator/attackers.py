"""Attackers among the simulated devices, so every defence is measured on the real aggregator:
an attacking device trains like the others (its timing, bytes and staleness are real) and then
replaces its update before encoding it with the task's codec.

Kinds (``scale`` s; Δ its honestly trained update):
- ``scaled``: s·Δ (boosting, as in model replacement);
- ``signflip``: −s·Δ (pushes the model uphill);
- ``noise``: Gaussian noise with s times Δ's RMS per element;
- ``constant``: every element s times Δ's RMS (a direction no data gives);
- ``replay``: the first update it ever sent, again and again (a stale update as fresh);
- ``sybil``: colluding devices that all send one shared update per plan and version, −s·Δ of
  the first of them (one operator behind many joins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stamen.core.errors import UserError

KINDS = ("scaled", "signflip", "noise", "constant", "replay", "sybil")


@dataclass(frozen=True)
class AttackConfig:
    fraction: float = 0.0  # of the devices (GPU nodes are the operator's own)
    kind: str = "scaled"
    scale: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise UserError(f"[population.attackers] fraction must be in [0, 1), got {self.fraction}")
        if self.kind not in KINDS:
            raise UserError(f"[population.attackers] kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not self.scale > 0:
            raise UserError(f"[population.attackers] scale must be positive, got {self.scale}")


class Attackers:
    """Which devices attack (a seeded draw) and what each sends instead of its update."""

    def __init__(self, config: AttackConfig, device_ids: list[int], seed: int) -> None:
        self.config = config
        rng = np.random.default_rng([seed, 13])  # its own stream: the honest run's draws are unchanged
        count = round(config.fraction * len(device_ids))
        self.ids = set(rng.choice(device_ids, size=count, replace=False).tolist()) if count else set()
        self._first: dict[int, dict[str, torch.Tensor]] = {}
        self._shared: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._gen = torch.Generator().manual_seed(seed)

    def __contains__(self, device_id: int) -> bool:
        return device_id in self.ids

    def forge(self, device_id: int, plan: str, version: int, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s, kind = self.config.scale, self.config.kind
        if kind == "scaled":
            return {n: s * d for n, d in delta.items()}
        if kind == "signflip":
            return {n: -s * d for n, d in delta.items()}
        if kind in ("noise", "constant"):
            rms = float(torch.cat([d.flatten() for d in delta.values()]).pow(2).mean().sqrt())
            if kind == "constant":
                return {n: torch.full_like(d, s * rms) for n, d in delta.items()}
            return {n: torch.randn(d.shape, generator=self._gen) * (s * rms) for n, d in delta.items()}
        if kind == "replay":
            return self._first.setdefault(device_id, {n: d.clone() for n, d in delta.items()})
        return self._shared.setdefault((plan, version), {n: -s * d for n, d in delta.items()})
