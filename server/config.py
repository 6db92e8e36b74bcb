"""Federation settings: one frozen dataclass per section, each field with its default (the same
as the packaged ``federation.toml``, which a test holds them to), a docstring, and the
section's own checks; ``core.config.from_table`` reads a file onto them, so a typo stops the
server with one line naming the key instead of surfacing as a wrong number hours later. An
operator's file overrides only the keys it names. The aggregation section's rules are the
aggregator's own (``AggregatorConfig``, ``OuterConfig``): it builds them to check itself."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from stamen.compression.spec import parse as parse_codec
from stamen.core.config import from_table, read_toml
from stamen.core.errors import UserError
from stamen.core.hf import is_hf
from stamen.core.lora import TRAIN, TRAINED_BASES, LoraPlan, LoraSpace, lora_space, tier_lora_plans
from stamen.core.model import ModelSpec
from stamen.core.plan import Model, Plan, rotating_windows, tier_plans, window_plan
from stamen.core.train import TrainConfig
from stamen.server.aggregator import AggregatorConfig
from stamen.server.outer import OuterConfig
from stamen.server.privacy import PrivacyConfig
from stamen.server.robust import DefenceConfig


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class AggregationSettings:
    """``[aggregation]``: how updates merge into versions."""

    mode: str = "async"
    """``async`` (FedBuff: merge whoever is done) or ``rounds`` (synchronous FedAvg/DiLoCo: one
    round of tasks per version, see ``Scheduler``; needs ``tau_max = 0``)."""
    buffer_k: int = 4
    """Updates merged into each new version (FedBuff's K; in rounds, the round size)."""
    tau_max: int = 8
    """Updates more than this many versions stale are refused (HTTP 409)."""
    token_exponent: float = 1.0
    """Update weight = tokens^token_exponent · (1 + staleness)^−staleness_exponent."""
    staleness_exponent: float = 0.5
    """See ``token_exponent`` (½: FedBuff's 1/√(1+τ))."""
    combine: str = "mean"
    """How a flush combines its updates: ``mean`` (the weighted mean: FedBuff, FedAvg, DiLoCo)
    or ``add`` (each plan's updates averaged, different plans' progress added, each at its
    weight relative to the heaviest plan's; see ``server.aggregator``)."""
    paced_by: tuple[str, ...] = ()
    """Tiers whose updates count toward ``buffer_k`` (empty: every update). ``["gpu"]`` with
    ``buffer_k`` = the GPU nodes: versions are the nodes' rounds and the devices' updates join
    them (see ``server.aggregator``); pair with ``max_wait_s`` so a federation whose nodes stop
    still publishes."""
    max_tokens: int = 0
    """Also publish once the buffer holds this many tokens (0: never)."""
    max_wait_s: float = 0.0
    """Also publish when the oldest buffered update is this old (0: never); in rounds, the round
    deadline that closes a round dropouts leave short."""
    min_quorum: int = 1
    """... provided at least this many updates are buffered."""
    outer: str = "nesterov"
    """Outer optimizer: nesterov (DiLoCo), fedavg or fedadam."""
    outer_lr: float = 0.7
    """The outer optimizer's learning rate (1 with fedavg: the plain weighted mean)."""
    momentum: float = 0.9
    """Nesterov momentum μ, in [0, 1)."""

    def __post_init__(self) -> None:
        _require(self.mode in ("async", "rounds"), f"mode {self.mode!r}: use async or rounds")
        _require(self.mode != "rounds" or self.tau_max == 0,
                 'mode = "rounds" needs tau_max = 0: a round merges only its own updates')
        _require(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _require(self.mode != "rounds" or not self.paced_by,
                 'mode = "rounds" counts every update of a round: leave paced_by empty')
        _require(self.max_tokens >= 0 and self.max_wait_s >= 0, "max_tokens and max_wait_s must be >= 0")
        # The aggregator's and the outer optimizer's own checks; whether this section agrees
        # with [defence] and [privacy] is judged where all three are known (``load_config``).
        self.aggregator_config(DefenceConfig(rule="mean"))

    def aggregator_config(self, defence: DefenceConfig | None = None,
                          privacy: PrivacyConfig | None = None) -> AggregatorConfig:
        return AggregatorConfig(buffer_k=self.buffer_k, tau_max=self.tau_max, token_exponent=self.token_exponent,
                                staleness_exponent=self.staleness_exponent, combine=self.combine,
                                paced_by=tuple(self.paced_by), max_tokens=self.max_tokens or None,
                                max_wait_s=self.max_wait_s or None, min_quorum=self.min_quorum,
                                outer=OuterConfig(self.outer, self.outer_lr, self.momentum),
                                defence=defence or DefenceConfig(), privacy=privacy or PrivacyConfig())


@dataclass(frozen=True)
class TrainingSettings:
    """``[training]``: the inner training every tier shares."""

    seq_len: int = 64
    """Tokens per training sequence, every tier."""
    warmup_steps: int = 50
    """The inner lr schedule runs on one global step counter (Photon; it counts the GPU nodes'
    steps per round of nodes, see ``server.scheduler``): its warm-up ..."""
    total_steps: int = 20000
    """... and its length, in global steps."""
    min_lr_ratio: float = 0.1
    """The cosine schedule's floor, as a fraction of each tier's lr."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip per inner step."""

    def __post_init__(self) -> None:
        _require(self.seq_len >= 1, "seq_len must be at least 1")


@dataclass(frozen=True)
class SchedulerSettings:
    """``[scheduler]``: who gets which task, and when it lapses."""

    task_deadline_s: float = 600.0
    """A task not uploaded by then is reissued to another client."""
    max_in_flight: int = 16
    """Device tasks out at once (GPU nodes not counted): staleness runs about max_in_flight /
    buffer_k versions, so keep it a few K and under tau_max · K."""
    max_in_flight_alone: int = 0
    """Device tasks out at once while no GPU node is in the federation (0: ``max_in_flight``).
    Versions then follow the devices' own updates, K at a time, and staleness runs about
    this / buffer_k versions: a cap sized for versions paced by the nodes leaves devices alone
    training on weights many versions old (``Scheduler.next_task``)."""
    compute_share: float = 0.5
    """A task's estimated compute may fill this share of its deadline."""
    overselect: float = 1.3
    """Rounds only: device tasks per round over its device places (buffer_k minus the GPU
    nodes); the first arrivals close the round, the late are refused."""

    def __post_init__(self) -> None:
        _require(self.task_deadline_s > 0, "task_deadline_s must be positive")
        _require(self.max_in_flight >= 1, "max_in_flight must be at least 1")
        _require(self.max_in_flight_alone >= 0, "max_in_flight_alone must be at least 0 (0: max_in_flight)")
        _require(0 < self.compute_share <= 1, "compute_share must be in (0, 1]")
        _require(self.overselect >= 1, "overselect must be at least 1")


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: the HTTP server's limits and durability cadence."""

    max_body_mib: int = 64
    """Largest request body accepted."""
    request_timeout_s: float = 120.0
    """Per request, including reading the body."""
    long_poll_s: float = 30.0
    """Longest a GET /v1/task may wait for work."""
    checkpoint_every: int = 10
    """Versions between model checkpoints (the journal covers the rest)."""
    joins_per_minute: float = 60.0
    """Joins one join token may make a minute on average (HTTP 429 beyond)."""
    join_burst: int = 10
    """Joins one join token may make at once: a leaked token cannot mint Sybils faster."""
    public_status: bool = False
    """True: /v1/status and /metrics answer anyone with aggregate figures (no client list)."""

    def __post_init__(self) -> None:
        _require(self.max_body_mib >= 1, "max_body_mib must be at least 1")
        _require(self.request_timeout_s > 0, "request_timeout_s must be positive")
        _require(self.long_poll_s >= 0, "long_poll_s must be >= 0")
        _require(self.checkpoint_every >= 1, "checkpoint_every must be at least 1")
        _require(self.joins_per_minute > 0, "joins_per_minute must be positive")
        _require(self.join_burst >= 1, "join_burst must be at least 1")


@dataclass(frozen=True)
class EvaluationSettings:
    """``[evaluation]``: how the server scores versions on held-out text (``--eval-data``)."""

    every: int = 1
    """Score every Nth published version (0: never)."""
    batches: int = 4
    """Held-out batches per score (fixed for the server's life, so scores compare)."""
    batch_size: int = 8
    """Sequences per batch, each ``[training] seq_len`` tokens."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "every must be >= 0 (0: never)")
        _require(self.batches >= 1 and self.batch_size >= 1, "batches and batch_size must be at least 1")


@dataclass(frozen=True)
class LoraSettings:
    """``[lora]``: fine-tune a pretrained base (``--model hf:PATH``) with LoRA plans. The
    federation's global tensors are then the adapter (``core.lora``); each tier trains its rank
    prefix (``core.lora.TIER_LORA``: phones 1/8 of ``rank``, GPU nodes all of it)."""

    rank: int = 0
    """The global adapter's rank r_max, GPU nodes' rank (0: no LoRA, train the model itself)."""
    alpha: float = 0.0
    """LoRA alpha; the adapter is scaled by alpha / rank (0: 2 x rank, FlowerTune's 64 at 32)."""
    targets: tuple[str, ...] = ()
    """Module names (or fnmatch patterns) to adapt; empty: PEFT's defaults for the model type."""
    rule: str = "fedavg"
    """``fedavg``: A and B train and are averaged (FlowerTune); ``exact``: A stays frozen at its
    seeded init (FFA-LoRA), so the averaged adapter's product is the clients' average product."""
    base: str = ""
    """Every tier's base precision (fp32, bf16, int8); empty: the tier table's. (nf4 is in
    ``stamen plans``' memory table only: no runtime here trains over a 4-bit base.)"""

    def __post_init__(self) -> None:
        _require(self.rank >= 0, "rank must be >= 0 (0: no LoRA)")
        _require(self.alpha >= 0, "alpha must be >= 0 (0: 2 x rank)")
        _require(self.rule in TRAIN, f"rule must be one of {', '.join(TRAIN)}")
        _require(self.base == "" or self.base in TRAINED_BASES, f"base must be empty or one of {', '.join(TRAINED_BASES)} "
                                                               f"(nf4 is for `stamen plans` only: nothing here trains over it)")

    def space(self, spec: ModelSpec) -> LoraSpace:
        """The global adapter over ``spec``'s architecture (read on the meta device: no weights)."""
        _require(is_hf(spec.name), f"[lora] fine-tunes a pretrained base: pass --model hf:PATH (a stamen "
                                   f"model folder from `stamen baseline` or `export-model` is one), not {spec.name!r}")
        return lora_space(spec.build(weights=False), self.rank, self.alpha or None, self.targets or None)


@dataclass(frozen=True)
class TierSettings:
    """``[tiers.NAME]``: one tier's local work and, optionally, its plan. A tier the packaged
    table lacks starts from ``NEW_TIER_BASE``'s settings and plan."""

    steps: int
    """Inner steps per task (cut for a slow client to fit its deadline)."""
    batch_size: int
    """Sequences per inner step."""
    optimizer: str
    """Inner optimizer: adamw or sgd."""
    lr: float
    """Inner peak learning rate."""
    codec: str
    """Upload codec spec, e.g. ``int8(block=256)+zstd(3)``."""
    blocks: tuple[int, ...] | None = None
    """Plan override: the blocks kept (None keeps the tier's default plan)."""
    width: float | None = None
    """Plan override: the width fraction kept."""
    train: tuple[str, ...] | None = None
    """Plan override: the name patterns that train."""
    window: int | None = None
    """Plan override: a top-window plan (``core.plan.window_plan``): every block kept at full
    width, only the last ``window`` blocks train. Excludes blocks, width and train."""
    rotate: bool = False
    """With ``window``, a device tier: while no GPU node is in the federation, the tier's tasks
    take every position of the window in turn, one per version, the bottom one training the
    embeddings too (``core.plan.rotating_windows``, FedRolex); with one, the top window
    (``Scheduler._plan`` says why)."""
    lr_alone: float = 0.0
    """A device tier's inner peak lr while no GPU node is in the federation (0: ``lr``): beside
    the nodes a device's update is a small correction to their step, alone it is the step."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be at least 1")
        _require(self.window is None or (self.window >= 1 and (self.blocks, self.width, self.train) == (None,) * 3),
                 "window must be at least 1, and excludes blocks, width and train")
        _require(not self.rotate or self.window is not None, "rotate needs window (the size of the rotating window)")
        _require(self.lr_alone >= 0, "lr_alone must be at least 0 (0: lr)")
        try:
            parse_codec(self.codec)  # a bad codec stops the server at start-up, not every upload
        except UserError as e:
            raise UserError(f"codec: {e}") from None


@dataclass(frozen=True)
class FederationConfig:
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    tiers: dict[str, TierSettings] = field(default_factory=dict)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def train_config(self, tier: str, alone: bool = False) -> TrainConfig:
        """The inner optimizer of a tier, on the federation's one global lr schedule; ``alone``:
        while no GPU node is in the federation (the tier's ``lr_alone``, when it sets one)."""
        t, s = self.tiers[tier], self.training
        return TrainConfig(optimizer=t.optimizer, lr=t.lr_alone if alone and t.lr_alone else t.lr,
                           min_lr_ratio=s.min_lr_ratio,
                           warmup_steps=s.warmup_steps, total_steps=s.total_steps,
                           weight_decay=s.weight_decay, grad_clip=s.grad_clip)

    def aggregator_config(self) -> AggregatorConfig:
        return self.aggregation.aggregator_config(self.defence, self.privacy)

    def plans(self, cfg: Model) -> dict[str, tuple[Plan | LoraPlan, ...]]:
        """Each tier's plans, in the order its tasks take them: one for most tiers (the default
        tier table with this file's overrides), every window position for a ``rotate`` tier;
        over a LoRA space, each tier's LoRA plan (a new tier takes the laptop's)."""
        if isinstance(cfg, LoraSpace):
            lora = tier_lora_plans(cfg, self.lora.rule, self.lora.base or None)
            for name, t in self.tiers.items():
                _require((t.blocks, t.width, t.train, t.window) == (None,) * 4,
                         f"[tiers.{name}] blocks/width/train/window shape submodels; a LoRA federation's plans are ranks")
            return {name: (lora.get(name) or replace(lora[NEW_TIER_BASE], name=f"lora-{name}"),) for name in self.tiers}
        defaults = tier_plans(cfg)
        out = {}
        for name, t in self.tiers.items():
            if t.window is not None:
                out[name] = rotating_windows(cfg, name, t.window) if t.rotate else (window_plan(cfg, name, t.window),)
                continue
            base = defaults.get(name) or defaults.get(NEW_TIER_BASE, defaults["gpu"])
            out[name] = (Plan(name, t.blocks if t.blocks is not None else base.blocks,
                              t.width if t.width is not None else base.width,
                              t.train if t.train is not None else base.train),)
        return out


def _default_text() -> str:
    return resources.files("stamen.server").joinpath("federation.toml").read_text()


NEW_TIER_BASE = "laptop"  # what a tier the packaged table lacks starts from, settings and plan alike
SECTIONS = {"aggregation": AggregationSettings, "training": TrainingSettings, "scheduler": SchedulerSettings,
            "server": ServerSettings, "evaluation": EvaluationSettings, "defence": DefenceConfig,
            "privacy": PrivacyConfig, "lora": LoraSettings}


def load_config(path: str | Path | None = None) -> FederationConfig:
    """The packaged settings, overridden key by key by the file at ``path`` (if any)."""
    data = tomllib.loads(_default_text())
    user = read_toml(Path(path), "federation config") if path is not None else {}
    for section, values in user.items():
        if section not in data:
            raise UserError(f"federation config: unknown section [{section}] (known: {', '.join(data)})")
        if not isinstance(values, dict):
            raise UserError(f"federation config: [{section}] must be a table")
        if section == "tiers":
            for tier, tv in values.items():
                if not isinstance(tv, dict):
                    raise UserError(f"federation config: [tiers.{tier}] must be a table")
                data["tiers"][tier] = {**data["tiers"].get(tier, data["tiers"][NEW_TIER_BASE]), **tv}
        else:
            data[section].update(values)
    sections = {name: from_table(cls, data[name], f"federation config [{name}]") for name, cls in SECTIONS.items()}
    tiers = {name: from_table(TierSettings, v, f"federation config [tiers.{name}]") for name, v in data["tiers"].items()}
    if "gpu" not in tiers:
        raise UserError("federation config [tiers.gpu] is required: gpu-role clients train it")
    unknown = [t for t in sections["aggregation"].paced_by if t not in tiers]
    if unknown:
        raise UserError(f"federation config [aggregation] paced_by: unknown tier {unknown[0]!r} "
                        f"(tiers: {', '.join(tiers)})")
    rotating = [t for t in ("gpu", *sections["aggregation"].paced_by) if tiers[t].rotate]
    if rotating:
        raise UserError(f"federation config [tiers.{rotating[0]}] rotate: only a device tier outside paced_by rotates")
    cfg = FederationConfig(**sections, tiers=tiers)
    for name in tiers:
        try:
            cfg.train_config(name)  # TrainConfig checks optimizer and lr
        except UserError as e:
            raise UserError(f"federation config [tiers.{name}]: {e}") from None
    try:
        cfg.aggregator_config()  # settings of different sections that must agree ([privacy], [defence])
    except UserError as e:
        raise UserError(f"federation config: {e}") from None
    return cfg
