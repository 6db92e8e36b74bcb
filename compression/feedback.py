"""Error feedback: what a lossy codec dropped from this update is added to the next one.

Top-k without it loses most of the update's mass for good; with it, the sum of what the server
decodes tracks the sum of the true updates and only the last residual is ever missing
(SparseLoCo, DeMo). The residual lives on the client, one per plan (a plan's tensors have their
own names and slice shapes), and is saved with safetensors so it survives a restart.

``decay`` β < 1 is SparseLoCo's variant: e ← β·e + Δ, send C(e), e ← e − C(e). The residual
then doubles as the outer momentum (a direction that persists over rounds builds up in e until
it is large enough to be sent), so the server applies the averaged sparse updates with plain
FedAvg and keeps no momentum of its own; and what was never sent fades instead of arriving
rounds later at full size against a model that has moved on. With β = 1 this is classic error
feedback. Either way the invariant is exact: β-decayed sum of decoded updates + residual =
β-decayed sum of true updates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from stamen.compression.codecs import compress, reconstruct, to_numpy
from stamen.compression.spec import CodecSpec, parse
from stamen.core.errors import UserError
from stamen.core.wire import encode_frame

SEP = "/"  # plan hashes are hex, so the first separator splits a saved key unambiguously


class ErrorFeedback:
    """Residuals keyed by plan hash, then tensor name (float32), decayed by ``decay`` each round."""

    def __init__(self, decay: float = 1.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise UserError(f"error feedback decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.residuals: dict[str, dict[str, torch.Tensor]] = {}

    def encode(self, plan_hash: str, delta: dict[str, torch.Tensor], spec: str | CodecSpec,
               kind: str = "update", meta: dict | None = None) -> bytes:
        """Encode delta + decay · residual; keep as the new residual what the receiver will not see."""
        spec = spec if isinstance(spec, CodecSpec) else parse(spec)
        old = self.residuals.get(plan_hash, {})
        corrected = {}
        for name, d in delta.items():
            x = to_numpy(name, d)
            if name in old:
                x = x + np.float32(self.decay) * old[name].numpy().reshape(-1)
            corrected[name] = torch.from_numpy(x).view(d.shape)
        frame = compress(corrected, spec, kind, meta)
        data = encode_frame(frame, spec.zstd)  # before the subtraction: parts may alias inputs
        seen = reconstruct(frame)
        self.residuals[plan_hash] = {n: torch.from_numpy(np.subtract(corrected[n].numpy(), seen[n].numpy()))
                                     for n in corrected}
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, decay: float = 1.0) -> "ErrorFeedback":
        return cls.from_bytes(Path(path).read_bytes(), decay)

    def to_bytes(self) -> bytes:
        """The residuals as one safetensors blob (float32, exact)."""
        return save({f"{plan}{SEP}{name}": t.contiguous()
                     for plan, ts in self.residuals.items() for name, t in ts.items()})

    @classmethod
    def from_bytes(cls, data: bytes, decay: float = 1.0) -> "ErrorFeedback":
        ef = cls(decay)
        for key, t in load(data).items():
            plan, _, name = key.partition(SEP)
            ef.residuals.setdefault(plan, {})[name] = t
        return ef
