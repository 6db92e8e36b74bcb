"""The asynchronous heterogeneous aggregator: pure logic, no I/O (the store makes it durable).

ARCHITECTURE.md's rule. An update i with base version b_i arriving at version v has staleness
τ_i = v − b_i, is rejected if τ_i > τ_max, and weighs w_i = tokens_i^a · (1 + τ_i)^(−s)
(a = 1, s = ½ by default: FedBuff's 1/√(1+τ)). Per element j its plan covers, the buffer adds
S_j += w_i Δ_i[j] and W_j += w_i. A flush (K updates, a token budget, or a max wait with a
quorum) forms g_j = S_j / W_j where W_j > 0, steps the outer optimizer only there, and
publishes version v + 1. With K = cohort size and τ_max = 0 this is synchronous FedAvg/DiLoCo.

Why W can be stored per slice rather than per element: a plan covers a tensor either whole or
along exactly one dimension (heads/hidden-unit prefixes; see ``core.plan``), and that dimension
is the same for every plan (c_attn/c_fc rows, c_proj columns). So the set of updates covering
element j depends only on j's position along that dimension, and W is exactly a vector along
it (a scalar for tensors no plan slices): no second model-sized buffer.

Accumulation streams (no update is kept after ``submit``): memory is the model, the outer
optimizer state, one buffer S, and the copy-on-write version history (a version keeps only the
tensors that changed after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from stamen.core.errors import UserError
from stamen.core.model import GPTConfig
from stamen.core.plan import Model, Plan, full_plan, global_shapes
from stamen.core.records import Update
from stamen.server.outer import OuterConfig, init_state, outer_step


class StaleUpdate(UserError):
    """τ > τ_max: the client must fetch the current version and redo its task (HTTP 409)."""

    def __init__(self, staleness: int, tau_max: int) -> None:
        super().__init__(f"update is {staleness} versions stale; the limit is {tau_max}: fetch the current model")
        self.staleness = staleness


class BadUpdate(UserError):
    """An update that does not fit its plan (names, shapes, values) or names an unknown version."""


@dataclass(frozen=True)
class AggregatorConfig:
    buffer_k: int = 8  # flush after K updates
    tau_max: int = 4  # largest staleness accepted
    token_exponent: float = 1.0
    staleness_exponent: float = 0.5
    max_tokens: int | None = None  # flush once the buffer holds this many tokens
    max_wait_s: float | None = None  # flush after this long since the buffer's first update...
    min_quorum: int = 1  # ...if it holds at least this many
    outer: OuterConfig = field(default_factory=OuterConfig)

    def __post_init__(self) -> None:
        if self.buffer_k < 1 or self.tau_max < 0 or self.min_quorum < 1:
            raise UserError("buffer_k and min_quorum must be >= 1 and tau_max >= 0")


@dataclass(frozen=True)
class Admission:
    """What ``check`` decided about an update that may enter the buffer."""

    staleness: int
    weight: float


@dataclass(frozen=True)
class FlushReport:
    version: int  # the version this flush published
    updates: int
    tokens: int
    coverage: float  # fraction of global elements some update covered
    mean_staleness: float
    update_norm: float  # ‖θ_new − θ_old‖ over all tensors
    reason: str  # "k", "tokens" or "wait"


@dataclass(frozen=True)
class _Layout:
    """How one plan's delta lands in the buffer: tensors it covers whole (added with one fused
    call) and sliced ones as (name, dim, runs of kept positions) — a view per run (one for a
    prefix, three for c_attn's q|k|v) instead of a slower index_add."""

    shapes: dict[str, tuple[int, ...]]
    whole: list[str]
    sliced: list[tuple[str, int, list[tuple[int, int]]]]


@dataclass
class _Buffer:
    count: int = 0
    tokens: int = 0
    staleness_sum: int = 0
    opened_at: float | None = None
    task_ids: list[str] = field(default_factory=list)


class Aggregator:
    def __init__(self, cfg: Model, weights: dict[str, torch.Tensor], config: AggregatorConfig,
                 version: int = 0) -> None:
        self.cfg, self.config, self.version = cfg, config, version
        shapes = global_shapes(cfg)
        if {n: tuple(w.shape) for n, w in weights.items()} != shapes:
            raise UserError("initial weights do not match the model's tensors")
        self._weights = {n: w.detach().clone() for n, w in weights.items()}
        self.opt_state = init_state(config.outer, self._weights)
        self.S = {n: torch.zeros_like(w) for n, w in self._weights.items()}
        self._wdim = _weight_dims(cfg)
        self.W = {n: torch.zeros(shapes[n][d] if d is not None else (), dtype=torch.float64)
                  for n, d in self._wdim.items()}
        self.buffer = _Buffer()
        self.seen: set[str] = set()  # every task id accepted, flushed or buffered
        self.history: dict[int, dict[str, torch.Tensor]] = {version: self._weights}
        self._plans: dict[str, _Layout] = {}

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The current global weights (treat as read-only: older versions share tensors)."""
        return self._weights

    def weights_at(self, version: int) -> dict[str, torch.Tensor]:
        if version not in self.history:
            raise BadUpdate(f"version {version} is not kept (current {self.version}, τ_max {self.config.tau_max})")
        return self.history[version]

    # --- admission --------------------------------------------------------------------------
    def _layout(self, plan: Plan) -> "_Layout":
        if plan.hash not in self._plans:
            sl, shapes = plan.slices(self.cfg), plan.shapes(self.cfg)
            names = plan.trainable(self.cfg)
            self._plans[plan.hash] = _Layout({n: shapes[n] for n in names}, [n for n in names if sl[n] is None],
                                             [(n, sl[n][0], _runs(sl[n][1])) for n in names if sl[n] is not None])
        return self._plans[plan.hash]

    def check(self, update: Update) -> Admission:
        """Judge an update without changing any state: raises StaleUpdate or BadUpdate."""
        tau = self.version - update.base_version
        if tau < 0:
            raise BadUpdate(f"base version {update.base_version} is newer than the current {self.version}")
        if tau > self.config.tau_max:
            raise StaleUpdate(tau, self.config.tau_max)
        if not (isinstance(update.tokens, int) and update.tokens > 0):
            raise BadUpdate(f"tokens must be a positive integer, got {update.tokens!r}")
        shapes = self._layout(update.plan).shapes
        if not shapes:
            raise BadUpdate(f"plan {update.plan.name!r} trains no tensor of this model")
        if set(update.delta) != set(shapes):
            missing, extra = sorted(set(shapes) - set(update.delta)), sorted(set(update.delta) - set(shapes))
            raise BadUpdate(f"delta tensors do not match plan {update.plan.name!r}: missing {missing[:3]}, extra {extra[:3]}")
        for n, d in update.delta.items():
            if tuple(d.shape) != shapes[n]:
                raise BadUpdate(f"{n}: shape {tuple(d.shape)} but plan {update.plan.name!r} needs {shapes[n]}")
            if not d.is_floating_point():
                raise BadUpdate(f"{n}: dtype {d.dtype} is not floating point")
        # One read pass over all tensors: a NaN or inf anywhere makes its norm non-finite (so
        # does a norm past float32's range, which no sane update reaches).
        norms = torch.stack(torch._foreach_norm(list(update.delta.values())))
        if not bool(torch.isfinite(norms).all()):
            bad = [n for n, x in zip(update.delta, norms.tolist()) if not math.isfinite(x)]
            raise BadUpdate(f"{bad[0]}: values must be finite")
        weight = update.tokens ** self.config.token_exponent * (1 + tau) ** -self.config.staleness_exponent
        return Admission(tau, weight)

    # --- the buffer -------------------------------------------------------------------------
    @torch.no_grad()
    def submit(self, update: Update, now: float) -> FlushReport | None:
        """Add an update to the buffer; returns the flush report if it triggered one. A task
        id seen before is ignored (idempotent re-sends) and returns None."""
        if update.task_id in self.seen:
            return None
        adm = self.check(update)
        w, d, lay = adm.weight, update.delta, self._layout(update.plan)
        if lay.whole:  # one fused call over every tensor the plan covers whole
            torch._foreach_add_([self.S[n] for n in lay.whole], [d[n] for n in lay.whole], alpha=w)
            torch._foreach_add_([self.W[n] for n in lay.whole], w)
        for n, dim, runs in lay.sliced:
            offset = 0
            for start, stop in runs:
                self.S[n].narrow(dim, start, stop - start).add_(d[n].narrow(dim, offset, stop - start), alpha=w)
                self.W[n][start:stop] += w
                offset += stop - start
        b = self.buffer
        b.count, b.tokens, b.staleness_sum = b.count + 1, b.tokens + update.tokens, b.staleness_sum + adm.staleness
        b.opened_at = now if b.opened_at is None else b.opened_at
        b.task_ids.append(update.task_id)
        self.seen.add(update.task_id)
        if b.count >= self.config.buffer_k:
            return self.flush("k")
        if self.config.max_tokens is not None and b.tokens >= self.config.max_tokens:
            return self.flush("tokens")
        return None

    def due(self, now: float) -> bool:
        """Whether the buffer has waited max_wait_s and holds a quorum."""
        b, c = self.buffer, self.config
        return (c.max_wait_s is not None and b.opened_at is not None and b.count >= c.min_quorum
                and now - b.opened_at >= c.max_wait_s)

    def poll(self, now: float) -> FlushReport | None:
        """The max-wait flush, if due."""
        return self.flush("wait") if self.due(now) else None

    @torch.no_grad()
    def flush(self, reason: str) -> FlushReport:
        """Apply the outer optimizer where W > 0 and publish version + 1."""
        new, covered, total, norm2 = dict(self._weights), 0, 0, 0.0
        for n, theta in self._weights.items():
            W, dim = self.W[n], self._wdim[n]
            total += theta.numel()
            if not bool((W > 0).any()):
                continue
            shape = [1] * theta.dim()
            if dim is not None:
                shape[dim] = -1
            Wb = W.view(shape) if W.dim() else W
            mask = (Wb > 0)
            g = (self.S[n] / torch.where(mask, Wb, torch.ones_like(Wb))).to(theta.dtype)
            full = bool(mask.all())
            new[n] = outer_step(self.config.outer, n, theta, g, None if full else mask, self.opt_state)
            covered += theta.numel() if full else int(mask.sum()) * (theta.numel() // W.numel())
            norm2 += float((new[n] - theta).double().pow(2).sum())
            self.S[n].zero_()
            W.zero_()
        b = self.buffer
        report = FlushReport(self.version + 1, b.count, b.tokens, covered / total,
                             b.staleness_sum / max(1, b.count), math.sqrt(norm2), reason)
        self.version += 1
        self._weights = new
        self.history[self.version] = new
        for v in [v for v in self.history if v < self.version - self.config.tau_max]:
            del self.history[v]
        self.buffer = _Buffer()
        return report

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything but ``seen`` (the store's journal holds it): flat tensors for safetensors
        and a JSON-able meta dict. History tensors are stored once per distinct tensor."""
        tensors = {f"weights/{n}": w for n, w in self._weights.items()}
        tensors |= {f"opt/{k}": t for k, t in self.opt_state.items()}
        tensors |= {f"S/{n}": t for n, t in self.S.items()} | {f"W/{n}": t for n, t in self.W.items()}
        for v in sorted(self.history)[:-1]:
            nxt = self.history[v + 1]
            tensors |= {f"hist/{v}/{n}": t for n, t in self.history[v].items() if t is not nxt[n]}
        b = self.buffer
        meta = {"version": self.version, "history": sorted(self.history), "count": b.count, "tokens": b.tokens,
                "staleness_sum": b.staleness_sum, "opened_at": b.opened_at, "task_ids": b.task_ids}
        return tensors, meta

    @classmethod
    def from_state(cls, cfg: Model, config: AggregatorConfig, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any], seen: set[str]) -> "Aggregator":
        weights = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("weights/")}
        agg = cls(cfg, weights, config, meta["version"])
        for group, target in (("opt", agg.opt_state), ("S", agg.S), ("W", agg.W)):
            for k in target:
                target[k].copy_(tensors[f"{group}/{k}"])
        for v in sorted(meta["history"], reverse=True)[1:]:
            agg.history[v] = {n: tensors.get(f"hist/{v}/{n}", t) for n, t in agg.history[v + 1].items()}
        agg.buffer = _Buffer(meta["count"], meta["tokens"], meta["staleness_sum"], meta["opened_at"],
                             list(meta["task_ids"]))
        agg.seen = set(seen)
        return agg


def _runs(pos: torch.Tensor) -> list[tuple[int, int]]:
    """Ascending positions as maximal (start, stop) runs: [0 1 2 8 9] → [(0, 3), (8, 10)]."""
    runs: list[tuple[int, int]] = []
    for p in pos.tolist():
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def _weight_dims(cfg: Model) -> dict[str, int | None]:
    """Per global tensor, the one dimension width cuts slice (None if none does), read off the
    narrowest possible plan: every width plan slices the same dimension of a given tensor."""
    if not isinstance(cfg, GPTConfig):
        return {n: None for n in global_shapes(cfg)}
    narrow = Plan("narrowest", full_plan(cfg).blocks, 1e-9)
    return {n: (sl[0] if sl is not None else None) for n, sl in narrow.slices(cfg).items()}
