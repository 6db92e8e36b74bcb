"""Federation settings: the packaged ``federation.toml`` holds every default (with comments that
say what each does), and an operator's file overrides only the keys it names. Settings are read
into frozen dataclasses once, at start-up, so a typo stops the server with one line instead of
surfacing as a wrong number hours later."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from stamen.core.errors import UserError
from stamen.core.model import GPTConfig
from stamen.core.plan import Plan, tier_plans
from stamen.core.train import TrainConfig
from stamen.server.aggregator import AggregatorConfig
from stamen.server.outer import OuterConfig


@dataclass(frozen=True)
class AggregationSettings:
    mode: str
    buffer_k: int
    tau_max: int
    token_exponent: float
    staleness_exponent: float
    max_wait_s: float
    min_quorum: int
    outer: str
    outer_lr: float
    momentum: float


@dataclass(frozen=True)
class TrainingSettings:
    seq_len: int
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float


@dataclass(frozen=True)
class SchedulerSettings:
    task_deadline_s: float
    max_in_flight: int
    compute_share: float
    overselect: float


@dataclass(frozen=True)
class ServerSettings:
    max_body_mib: int
    request_timeout_s: float
    long_poll_s: float
    checkpoint_every: int


@dataclass(frozen=True)
class TierSettings:
    steps: int
    batch_size: int
    optimizer: str
    lr: float
    codec: str
    blocks: tuple[int, ...] | None = None  # plan overrides; None keeps the tier's default plan
    width: float | None = None
    train: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FederationConfig:
    aggregation: AggregationSettings
    training: TrainingSettings
    scheduler: SchedulerSettings
    server: ServerSettings
    tiers: dict[str, TierSettings]

    def train_config(self, tier: str) -> TrainConfig:
        """The inner optimizer of a tier, on the federation's one global lr schedule."""
        t, s = self.tiers[tier], self.training
        return TrainConfig(optimizer=t.optimizer, lr=t.lr, min_lr_ratio=s.min_lr_ratio,
                           warmup_steps=s.warmup_steps, total_steps=s.total_steps,
                           weight_decay=s.weight_decay, grad_clip=s.grad_clip)

    def aggregator_config(self) -> AggregatorConfig:
        a = self.aggregation
        return AggregatorConfig(buffer_k=a.buffer_k, tau_max=a.tau_max, token_exponent=a.token_exponent,
                                staleness_exponent=a.staleness_exponent, max_wait_s=a.max_wait_s or None,
                                min_quorum=a.min_quorum, outer=OuterConfig(a.outer, a.outer_lr, a.momentum))

    def plans(self, cfg: GPTConfig) -> dict[str, Plan]:
        """Each tier's plan: the default tier table with this file's overrides."""
        defaults = tier_plans(cfg)
        out = {}
        for name, t in self.tiers.items():
            base = defaults.get(name, defaults["gpu"])
            out[name] = Plan(name, t.blocks if t.blocks is not None else base.blocks,
                             t.width if t.width is not None else base.width,
                             t.train if t.train is not None else base.train)
        return out


def _default_text() -> str:
    return resources.files("stamen.server").joinpath("federation.toml").read_text()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Field type (as written in the dataclasses above) → (check, conversion). Ints are accepted
# where floats are expected, as TOML users write ``lr = 1`` too.
_KINDS = {
    "int": (_is_int, int),
    "float": (_is_number, float),
    "str": (lambda v: isinstance(v, str), str),
    "tuple[int, ...]": (lambda v: isinstance(v, list) and all(map(_is_int, v)), tuple),
    "tuple[str, ...]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), tuple),
}


def _typed(where: str, value: Any, kind: str) -> Any:
    ok, convert = _KINDS[kind.removesuffix(" | None")]
    if not ok(value):
        raise UserError(f"federation config {where}: {value!r} has the wrong type (expected {kind.removesuffix(' | None')})")
    return convert(value)


def _section(cls: type, name: str, values: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"federation config [{name}]: unknown key {key!r} (known: {', '.join(known)})")
    missing = [k for k, f in known.items() if k not in values and f.default is not None]
    if missing:
        raise UserError(f"federation config [{name}]: missing {', '.join(missing)}")
    return cls(**{k: _typed(f"[{name}] {k}", v, known[k].type) for k, v in values.items()})


def _check(cfg: FederationConfig) -> None:
    a, s = cfg.aggregation, cfg.scheduler
    rules = [
        (a.mode in ("async", "rounds"), f"[aggregation] mode {a.mode!r}: use async or rounds"),
        (a.mode != "rounds" or a.tau_max == 0, "[aggregation] mode = \"rounds\" needs tau_max = 0: a round merges only its own updates"),
        (a.buffer_k >= 1, "[aggregation] buffer_k must be at least 1"),
        (a.tau_max >= 0, "[aggregation] tau_max must be at least 0"),
        (a.outer in ("nesterov", "fedavg", "fedadam"), f"[aggregation] outer {a.outer!r}: use nesterov, fedavg or fedadam"),
        (a.outer_lr > 0, "[aggregation] outer_lr must be positive"),
        (0 <= a.momentum < 1, "[aggregation] momentum must be in [0, 1)"),
        (a.min_quorum >= 1, "[aggregation] min_quorum must be at least 1"),
        (a.max_wait_s >= 0, "[aggregation] max_wait_s must be >= 0"),
        (cfg.training.seq_len >= 1, "[training] seq_len must be at least 1"),
        (s.task_deadline_s > 0, "[scheduler] task_deadline_s must be positive"),
        (s.max_in_flight >= 1, "[scheduler] max_in_flight must be at least 1"),
        (0 < s.compute_share <= 1, "[scheduler] compute_share must be in (0, 1]"),
        (s.overselect >= 1, "[scheduler] overselect must be at least 1"),
        (cfg.server.max_body_mib >= 1, "[server] max_body_mib must be at least 1"),
        (cfg.server.request_timeout_s > 0, "[server] request_timeout_s must be positive"),
        (cfg.server.long_poll_s >= 0, "[server] long_poll_s must be >= 0"),
        (cfg.server.checkpoint_every >= 1, "[server] checkpoint_every must be at least 1"),
        ("gpu" in cfg.tiers, "[tiers.gpu] is required: gpu-role clients train it"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(f"federation config {message}")
    for name, t in cfg.tiers.items():
        if t.steps < 1 or t.batch_size < 1:
            raise UserError(f"federation config [tiers.{name}]: steps and batch_size must be at least 1")
        cfg.train_config(name)  # TrainConfig checks optimizer and lr


def load_config(path: str | Path | None = None) -> FederationConfig:
    """The defaults, overridden key by key by the file at ``path`` (if any)."""
    data = tomllib.loads(_default_text())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"federation config not found: {p}")
        try:
            user = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"federation config {p}: {e}") from None
        for section, values in user.items():
            if section not in data:
                raise UserError(f"federation config: unknown section [{section}] (known: {', '.join(data)})")
            if not isinstance(values, dict):
                raise UserError(f"federation config: [{section}] must be a table")
            if section == "tiers":
                for tier, tv in values.items():
                    if not isinstance(tv, dict):
                        raise UserError(f"federation config: [tiers.{tier}] must be a table")
                    merged = dict(data["tiers"].get(tier, data["tiers"]["laptop"]))
                    merged.update(tv)
                    data["tiers"][tier] = merged
            else:
                data[section].update(values)
    cfg = FederationConfig(
        aggregation=_section(AggregationSettings, "aggregation", data["aggregation"]),
        training=_section(TrainingSettings, "training", data["training"]),
        scheduler=_section(SchedulerSettings, "scheduler", data["scheduler"]),
        server=_section(ServerSettings, "server", data["server"]),
        tiers={name: _section(TierSettings, f"tiers.{name}", v) for name, v in data["tiers"].items()},
    )
    _check(cfg)
    return cfg

