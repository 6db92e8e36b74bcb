"""The records that cross between roles: a Task (server → client) and an Update (client →
server). They live in core because the server, the edge client and the simulator all speak
them and may not import each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from stamen.core.train import TrainConfig

if TYPE_CHECKING:
    from stamen.core.plan import Plan


@dataclass(frozen=True)
class Task:
    """One unit of local work, bound to one client: start from ``base_version``, train the
    ``plan`` submodel for ``steps`` steps, upload the pseudo-gradient encoded with ``codec``."""

    task_id: str
    client_id: str
    base_version: int
    plan: "Plan"
    runtime: str  # "torch", "ort" or "executorch"
    steps: int
    batch_size: int
    seq_len: int
    train: TrainConfig
    step_offset: int  # global step at which this task's lr schedule starts (Photon)
    codec: str  # upload codec spec, e.g. "int8(block=256)+zstd(3)"
    deadline: float  # seconds since the epoch; the server reissues the work after it
    seed: int = 0  # for the client's batch sampling

    def to_dict(self) -> dict[str, Any]:
        # Not asdict: it deep-copies the plan, and walks the flat TrainConfig at ~25 µs, twice
        # per task a server issues (the ledger's row and the answer).
        d = {name: getattr(self, name) for name in _TASK_FIELDS}
        d["plan"] = self.plan.to_dict()
        d["train"] = {name: getattr(self.train, name) for name in _TRAIN_FIELDS}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Task":
        from stamen.core.plan import Plan

        d = dict(d)
        d["plan"] = Plan.from_dict(d["plan"])
        t = dict(d["train"])
        t["betas"] = tuple(t["betas"])
        d["train"] = TrainConfig(**t)
        return cls(**d)


# Field names, listed once: ``dataclasses.fields`` builds its tuple again on every call.
_TASK_FIELDS = tuple(f.name for f in fields(Task))
_TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))


@dataclass
class Update:
    """A client's result: the pseudo-gradient Δ = θ_base − θ_local over the plan's trainable
    tensors, under global tensor names and shaped like the plan's extracted slices."""

    task_id: str
    base_version: int
    plan: "Plan"
    delta: dict[str, torch.Tensor]
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)
    # the delta's tensors end to end in ``delta``'s order, float32 (``delta`` holds views of it),
    # where the wire decoder produced them so: the robust filter takes an update's row from it
    # in one copy. None: not known.
    flat: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Capabilities:
    """What a client declares when it joins (probed on real hardware, drawn from a device
    profile in the simulator); the scheduler picks its plan and steps from it."""

    role: str  # "device" or "gpu"
    memory_bytes: int  # memory the client lets training use
    flops: float  # sustained training FLOP/s
    runtimes: tuple[str, ...] = ("torch",)
    up_bytes_s: float = 1e6
    down_bytes_s: float = 1e7
    cores: int = 1
    accelerator: str = ""  # e.g. "cuda:NVIDIA H100", "jetson:orin"
    # Hardware class, named like the tier table (phone-low, phone-high, laptop, jetson, gpu):
    # the largest tier the client may get. "" = unknown, so memory and time alone decide.
    device_class: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Capabilities":
        """Tolerant both ways: a key an older client omits takes its default, and a key a newer
        client adds is ignored, so clients and servers of different versions still join."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in dict(d).items() if k in known}
        d["runtimes"] = tuple(d.get("runtimes", ("torch",)))
        return cls(**d)
