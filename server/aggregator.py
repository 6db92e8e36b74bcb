"""The asynchronous heterogeneous aggregator: pure logic, no I/O (the store makes it durable).

ARCHITECTURE.md's rule. An update i with base version b_i arriving at version v has staleness
τ_i = v − b_i, is rejected if τ_i > τ_max, and weighs w_i = tokens_i^a · (1 + τ_i)^(−s)
(a = 1, s = ½ by default: FedBuff's 1/√(1+τ)). Per element j its plan covers, the buffer adds
S_j += w_i Δ_i[j] and W_j += w_i. A flush (K updates, a token budget, or a max wait with a
quorum) forms g_j = S_j / W_j where W_j > 0, steps the outer optimizer only there, and
publishes version v + 1. With K = cohort size and τ_max = 0 this is synchronous FedAvg/DiLoCo.

``combine = "add"`` (issue 11): unequal work adds up instead of diluting. A GPU node's update
is 10 warm AdamW steps; a phone's is 4 fresh ones on a quarter of the batch. Under the mean, a
flush of one GPU update and nine device updates moves the model by 5/14 of the GPU's step plus
the devices' small, noisy ones, so adding devices shrinks the GPU nodes' progress (measured: a
mixed federation below its GPU nodes alone). "add" treats updates of one plan as estimates of
one step, averaged as DiLoCo's workers are, and different plans as different work, added: per
element g_j = Σ_i w_i Δ_i[j] / N_j with N_j = max_p T_p over the plans p covering j, where
T_p = Σ tokens_i^a over p's updates in the buffer (w_i = tokens_i^a · s(τ_i) as above). The
heaviest plan there moves the element by its mean (discounted by staleness, as FedBuff's
Σ s(τ_i) Δ_i / K is); every other plan adds its own mean at its tokens' share of the heaviest
plan's. With one plan and nothing stale it is the mean exactly, so the synchronous FedAvg and
DiLoCo equivalences hold; each plan's share is at most 1, so |g_j| ≤ (plans) · max ‖Δ_i‖, the
bound the finite guard uses. The robust rules reduce every update of an element to one
statistic, so "add" takes the mean rule only.

``paced_by`` (issue 11): versions paced by the GPU nodes. A flush counts toward K only the
updates of the named tiers' plans (``paced_by = ("gpu",)``, K = the number of nodes); the
devices' updates that arrived meanwhile join the same flush. Why: under FedBuff's count of
any K updates, a node's update lands in a flush of whatever devices happened to arrive, alone
or beside the other node's, and the flush boundaries alone cost the nodes progress. Measured
in the simulator (private text, seed 0, 60 virtual s, the nodes' hardware and data order the
same in every run; all / public / private): the 2 nodes alone 2.586 / 2.439 / 2.923; with
1,000 devices, K = any 10 updates, 2.669 / 2.525 / 3.014, and the same with the devices'
updates weighted 0, so that they change nothing but the flush boundaries, 2.706 / 2.554 /
3.079: the devices were helping, and the boundaries cost more. Paced by the nodes, the
zero-weight run equals the nodes alone bit for bit: a mixed federation's versions are the
nodes' own rounds, so devices can only add to them (and, versions being slower, arrive less
stale). A federation whose paced tiers stop reporting stalls; ``max_wait_s`` publishes what
the buffer holds after that long. An empty ``paced_by`` (the default) counts every update:
FedBuff, and the synchronous equivalences. Pacing holds only while a client of a paced tier
is in the federation (``pace``, which the coordinator calls as clients register): without
one, every update counts, as under FedBuff. A federation of devices alone would otherwise
publish only at ``max_wait_s`` (the simulator's default: one version per 10 virtual s,
whatever arrived). The flag is checkpointed; journal rows after a checkpoint replay under
the checkpoint's flag, which is the live one unless the first client of a paced tier joined
after that checkpoint.

Why W can be stored per slice rather than per element: a plan covers a tensor either whole or
along exactly one dimension (heads/hidden-unit prefixes; see ``core.plan``), and that dimension
is the same for every plan (c_attn/c_fc rows, c_proj columns). So the set of updates covering
element j depends only on j's position along that dimension, and W is exactly a vector along
it (a scalar for tensors no plan slices): no second model-sized buffer.

Accumulation streams (no update is kept after ``submit``): memory is the model, the outer
optimizer state, one buffer S, and the copy-on-write version history (a version keeps only the
tensors that changed after it). Both hot paths work on views and in place: ``submit`` adds an
update with one fused ``_foreach_add_`` over per-plan cached views of S (a prefix slice is one
view, c_attn's q|k|v three), and ``flush`` divides, steps the optimizer and zeroes S on views
of the covered regions, so its only allocation is the new version itself.

Defences (``server.robust``): each update is clipped to a norm bound learned from recent
updates of its tier's plan (none borrowed from other tiers), folded into its weight
(S += w·c·Δ, W += w, so the coverage rule holds for clipped updates exactly); an update that
could make the next version non-finite is refused before it touches the buffer; and the buffer may be reduced by a coordinate-wise robust rule
(trimmed mean, median) or an outlier filter instead of the mean. Those rules need every update
of the buffer, so only they keep the buffered updates (K of them, each the size of its plan).

Idempotency: ``seen`` maps the task ids of accepted updates to their base versions, and forgets
an id once its base is more than τ_max + 1 versions old: a re-send of it is then stale and
``check`` rejects it, so forgetting can never apply an update twice, and ``seen`` stays as
small as the window (the extra version lets a re-send that races the flush its own update
triggered still read as a duplicate rather than as stale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import itertools
import math
import secrets
import weakref

import numpy as np
import torch

from stamen.core.errors import UserError
from stamen.core.plan import Model, Plan, global_shapes
from stamen.core.records import Update
from stamen.server.layout import Layout, along, wcut, weight_dims
from stamen.server.outer import STATE, OuterConfig, direction_, init_state
from stamen.server.privacy import PrivacyConfig, add_noise_, epsilon
from stamen.server.robust import SAFE_MAX, DefenceConfig, NormHistory, filter_passing, norm_of, square, step_bound
from stamen.server.robust_matrix import coordinatewise_stats, filter_blocks


COMBINE = ("mean", "add")


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
    combine: str = "mean"  # "mean": g = S / W; "add": plans add up (see ``flush``)
    paced_by: tuple[str, ...] = ()  # plan (tier) names whose updates count toward buffer_k; () = all
    max_tokens: int | None = None  # flush once the buffer holds this many tokens
    max_wait_s: float | None = None  # flush after this long since the buffer's first update...
    min_quorum: int = 1  # ...if it holds at least this many
    outer: OuterConfig = field(default_factory=OuterConfig)
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.buffer_k < 1 or self.tau_max < 0 or self.min_quorum < 1:
            raise UserError("buffer_k and min_quorum must be >= 1 and tau_max >= 0")
        if self.combine not in COMBINE:
            raise UserError(f"unknown combine rule {self.combine!r}: use one of {', '.join(COMBINE)}")
        if self.combine == "add" and self.defence.rule != "mean":
            raise UserError(f'combine = "add" needs the mean defence rule: {self.defence.rule!r} '
                            "reduces every update of an element to one statistic")
        if self.privacy.enabled and self.defence.rule != "mean":
            # A rule that reads every update (median, trim, filter) lets one device decide
            # whether another's update counts: its share of S is then no longer bounded by C.
            raise UserError(f'[privacy] enabled needs [defence] rule = "mean", not {self.defence.rule!r}: '
                            "a robust rule breaks the noise's bound on one device's share")


@dataclass(frozen=True)
class Admission:
    """What ``check`` decided about an update that may enter the buffer."""

    staleness: int
    weight: float
    norm: float = 0.0  # ‖Δ‖ as sent
    scale: float = 1.0  # the norm bound's clip factor c ≤ 1: the buffer takes c·Δ


@dataclass(frozen=True)
class FlushReport:
    version: int  # the version this flush published
    updates: int
    tokens: int
    coverage: float  # fraction of global elements some update covered
    mean_staleness: float
    update_norm: float  # ‖θ_new − θ_old‖ over all tensors (as lr · ‖d‖: equal up to rounding)
    reason: str  # "k", "tokens" or "wait"


@dataclass
class _Buffer:
    count: int = 0
    tokens: int = 0
    staleness_sum: int = 0
    opened_at: float | None = None
    task_ids: list[str] = field(default_factory=list)
    g_max: float = 0.0  # the largest clipped norm buffered: bounds every |g_j| of the flush
    kept: list[tuple[Update, float, float]] = field(default_factory=list)  # (update, w, c): robust rules only
    plan_w: dict[Plan, float] = field(default_factory=dict)  # Σ tokens^a per plan: combine = "add" only
    paced: int = 0  # updates that count toward buffer_k (all of them unless ``paced_by`` names tiers)


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
        self._wdim = weight_dims(cfg)
        self._numel = sum(w.numel() for w in self._weights.values())
        # W's tensors are views of one float64 buffer, so an update's weight lands on every
        # element its plan covers with one numpy add (``Layout.windex``: a float64 add, the
        # same number torch's gives) instead of a torch op per tensor
        wshapes = {n: (shapes[n][d],) if d is not None else () for n, d in self._wdim.items()}
        self._w = np.zeros(sum(math.prod(s) for s in wshapes.values()))
        ends = itertools.accumulate(math.prod(s) for s in wshapes.values())
        base = torch.from_numpy(self._w)  # one storage: the views' offsets are places in the buffer
        self.W = {n: base[e - math.prod(s):e].view(s) for (n, s), e in zip(wshapes.items(), ends)}
        # W's elements laid out with a gap after each tensor's, so a flush finds the runs of
        # W > 0 of every tensor at once (``_covered``) and no run crosses from one to the next
        sizes = [math.prod(s) for s in wshapes.values()]
        self._wgap = np.arange(self._w.size) + np.repeat(np.arange(len(sizes)), sizes)
        self._wgap_start = np.cumsum([0] + sizes[:-1], dtype=np.int64) + np.arange(len(sizes))
        self._wnames = list(wshapes)
        self._wruns: dict[tuple[str, int, int], torch.Tensor] = {}  # (name, start, stop) → that run of W, shaped for S
        self.buffer = _Buffer()
        self.seen: dict[str, int] = {}  # task id → base version, for ids a re-send could still reach
        self._seen_at: dict[int, list[str]] = {}  # base version → its ids in ``seen``: a flush forgets by base
        self.history: dict[int, dict[str, torch.Tensor]] = {version: self._weights}
        self._plans: dict[Plan, Layout] = {}
        self._last_layout: tuple[Plan | None, Layout | None] = (None, None)
        self.norms = NormHistory(config.defence)
        # Scalar bounds on |θ_j| and on each optimizer state |k_j|, for the finite guard.
        self._theta_max = _max_abs(self._weights.values())
        self._state_max = {k: 0.0 for k in STATE[config.outer.kind]}
        self._measured: dict[int, tuple[weakref.ref, float]] = {}  # id(update) → (the update, its norm)
        self.pacing = bool(config.paced_by)  # K counts only the paced tiers' updates (``pace``)
        p = config.privacy
        self.dp_flushes = 0  # flushes that added noise: the accountant's composition count
        self._epsilon: dict[int, float] = {}  # flushes → ε, so the per-request check costs nothing
        self.dp_seed = (p.seed if p.seed is not None else secrets.randbits(62)) if p.enabled else 0

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The current global weights (treat as read-only: older versions share tensors)."""
        return self._weights

    def weights_at(self, version: int) -> dict[str, torch.Tensor]:
        if version not in self.history:
            raise BadUpdate(f"version {version} is not kept (current {self.version}, τ_max {self.config.tau_max})")
        return self.history[version]

    # --- admission --------------------------------------------------------------------------
    def _layout(self, plan: Plan) -> Layout:
        """The plan's layout, made once; the last one asked for is found by identity (an
        update's plan is its task's, one object per tier: hashing the frozen plan, asked four
        times per update, cost more than the lookup)."""
        last, lay = self._last_layout
        if last is plan:
            return lay
        lay = self._plans.get(plan)
        if lay is None:
            lay = self._plans[plan] = Layout.build(plan, self.cfg, self.S, self.W, self._w.size)
        self._last_layout = (plan, lay)
        return lay

    def measure(self, update: Update, squares: dict[str, float] | None = None, shaped: bool = False) -> float:
        """Check an update's structure against its plan and return its norm: the part of the
        judgement that does not depend on the current version, and the only part that reads
        the update's values. Pure and thread-safe, so the server runs it on the decode worker;
        remembered per update object (weakly), so ``check`` and ``submit`` on the event loop
        do not read the update again. ``squares``: sums of squares of (some of) its float32
        tensors that the decoder computed already (``robust.square`` of each); ``shaped``: the
        decoder checked its tensors' names and shapes against the plan's manifest already
        (``Coordinator.decode``), so they are not compared again. Raises BadUpdate."""
        key = id(update)
        known = self._measured.get(key)
        if known is not None and known[0]() is update:
            return known[1]
        shapes = self._layout(update.plan).shapes
        if not shapes:
            raise BadUpdate(f"plan {update.plan.name!r} trains no tensor of this model")
        if not shaped and set(update.delta) != set(shapes):
            missing, extra = sorted(set(shapes) - set(update.delta)), sorted(set(update.delta) - set(shapes))
            raise BadUpdate(f"delta tensors do not match plan {update.plan.name!r}: missing {missing[:3]}, extra {extra[:3]}")
        for n, d in () if shaped else update.delta.items():
            if d.shape != shapes[n]:
                raise BadUpdate(f"{n}: shape {tuple(d.shape)} but plan {update.plan.name!r} needs {shapes[n]}")
            if not d.is_floating_point():
                raise BadUpdate(f"{n}: dtype {d.dtype} is not floating point")
        squares = squares or {}
        with np.errstate(over="ignore"):
            size = norm_of([squares[n] if n in squares else square(update.delta[n])  # in the buffer's order
                            for n, _ in self._layout(update.plan).parts])
        if not math.isfinite(size):
            raise BadUpdate("the update's norm overflows float32: its values are far too large")
        measured = self._measured  # the entry goes when the update is freed (its id cannot be reused before)
        measured[key] = (weakref.ref(update, lambda _: measured.pop(key, None)), size)
        return size

    def check(self, update: Update) -> Admission:
        """Judge an update's structure, staleness and norm without changing any state: raises
        StaleUpdate or BadUpdate. Non-finite values are rejected at the boundary (every update
        reaches the aggregator through the wire decoder, ``core.wire.decode_frame``); here the
        update's norm (``measure``) feeds the norm bound and the finite guard."""
        tau = self.version - update.base_version
        if tau < 0:
            raise BadUpdate(f"base version {update.base_version} is newer than the current {self.version}")
        if tau > self.config.tau_max:
            raise StaleUpdate(tau, self.config.tau_max)
        if not (isinstance(update.tokens, int) and update.tokens > 0):
            raise BadUpdate(f"tokens must be a positive integer, got {update.tokens!r}")
        size = self.measure(update)
        weight = update.tokens ** self.config.token_exponent * (1 + tau) ** -self.config.staleness_exponent
        lay = self._layout(update.plan)
        scale, d, p = 1.0, self.config.defence, self.config.privacy
        if p.enabled:  # DP-FedBuff: clip to C, weigh 1 (a device's share of S is then at most C)
            if self.privacy_spent:
                raise BadUpdate(f"the privacy budget is spent (epsilon {self.epsilon():.3g} of {p.budget:g} "
                                f"at delta {p.delta:g}): training has stopped")
            weight, scale = 1.0, min(1.0, p.clip / size) if size > 0 else 1.0
        elif d.norm_bound != "off":
            bound = self.norms.bound(_norm_key(update.plan), lay.numel, tau)
            if size > bound:
                if d.norm_bound == "refuse":
                    raise BadUpdate(f"update norm {size:.4g} exceeds the bound {bound:.4g} "
                                    f"({d.norm_multiple:g}x the recent median for its plan)")
                scale = bound / size
        if self._theta_max + self._next_step(self._g_bound(max(self.buffer.g_max, scale * size), update.plan)) > SAFE_MAX:
            raise BadUpdate(f"update norm {scale * size:.4g} could make the next version non-finite")
        return Admission(tau, weight, size, scale)

    def _g_bound(self, g_max: float, plan: Plan | None = None) -> float:
        """A bound on every |g_j| of the next flush, given the largest buffered norm: g_max
        itself for the mean; for "add", g_j sums the plans' weighted means, each weighted by at
        most 1 (W_p ≤ N_j), so it is at most the number of distinct plans times g_max."""
        if self.config.combine != "add":
            return g_max
        return g_max * len(set(self.buffer.plan_w) | ({plan} if plan is not None else set()))

    def _next_step(self, g_max: float) -> float:
        o = self.config.outer
        return step_bound(o.kind, o.lr, o.momentum, o.betas, o.eps, g_max, self._state_max)

    # --- the buffer -------------------------------------------------------------------------
    def pace(self, present: bool) -> None:
        """Whether a client of a ``paced_by`` tier is in the federation: only then does K count
        their updates alone; without one every update counts (see the module docstring)."""
        self.pacing = bool(self.config.paced_by) and present

    @torch.no_grad()
    def submit(self, update: Update, now: float) -> FlushReport | None:
        """Add an update to the buffer; returns the flush report if it triggered one. A task
        id seen before is ignored (idempotent re-sends) and returns None."""
        if update.task_id in self.seen:
            return None
        adm = self.check(update)
        lay = self._layout(update.plan)
        torch._foreach_add_(lay.S, lay.pieces(update.delta), alpha=adm.weight * adm.scale)
        self._w[lay.windex] += adm.weight
        self.norms.record(_norm_key(update.plan), adm.scale * adm.norm, lay.numel)
        b = self.buffer
        b.count, b.tokens, b.staleness_sum = b.count + 1, b.tokens + update.tokens, b.staleness_sum + adm.staleness
        b.paced += not self.pacing or update.plan.name in self.config.paced_by
        b.g_max = max(b.g_max, adm.scale * adm.norm)
        if self.config.combine == "add":
            fresh = 1.0 if self.config.privacy.enabled else float(update.tokens) ** self.config.token_exponent
            b.plan_w[update.plan] = b.plan_w.get(update.plan, 0.0) + fresh
        if self.config.defence.rule != "mean":
            b.kept.append((update, adm.weight, adm.scale))
        b.opened_at = now if b.opened_at is None else b.opened_at
        b.task_ids.append(update.task_id)
        self.seen[update.task_id] = update.base_version
        self._seen_at.setdefault(update.base_version, []).append(update.task_id)
        if b.paced >= self.config.buffer_k:
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
        """Apply the outer optimizer where W > 0 and publish version + 1. Works on views of the
        covered regions (a whole tensor, or runs along its sliced dimension): g = S / W and the
        optimizer's direction are formed in S itself, and θ − lr · S (S is 0 where nothing was
        covered) is the only new memory: the new version."""
        if self.config.defence.rule != "mean":
            self._robust()
        regions = self._covered(self._divisor())
        touched = list(dict.fromkeys(n for n, *_ in regions))

        def cut(group: dict[str, torch.Tensor], prefix: str = "") -> list[torch.Tensor]:
            return [group[prefix + n] if dim is None else group[prefix + n].narrow(dim, a, b - a)
                    for n, dim, a, b, _ in regions]

        g = cut(self.S)
        covered = sum(t.numel() for t in g)
        new, moved = dict(self._weights), 0.0
        if regions:
            if self.config.privacy.enabled:
                gen = torch.Generator().manual_seed(self.dp_seed + self.version)  # the same on replay
                add_noise_(g, self.config.privacy, gen)
                self.dp_flushes += 1
            torch._foreach_div_(g, [W for *_, W in regions])
            direction_(self.config.outer, g, {k: cut(self.opt_state, f"{k}/") for k in STATE[self.config.outer.kind]})
            lr = self.config.outer.lr
            moved = lr * float(torch.stack(torch._foreach_norm(g)).double().norm())
            S = [self.S[n] for n in touched]
            new.update(zip(touched, torch._foreach_sub([self._weights[n] for n in touched], S, alpha=lr)))
            torch._foreach_zero_(S)
            torch._foreach_zero_([self.W[n] for n in touched])
        b = self.buffer
        report = FlushReport(self.version + 1, b.count, b.tokens, covered / self._numel,
                             b.staleness_sum / max(1, b.count), moved, reason)
        self._advance_bounds(self._g_bound(b.g_max))
        self.version += 1
        self._weights = new
        self.history[self.version] = new
        for v in [v for v in self.history if v < self.version - self.config.tau_max]:
            del self.history[v]
        oldest = self.version - self.config.tau_max - 1
        for base in [v for v in self._seen_at if v < oldest]:  # the ids of those bases, not a pass over all
            for t in self._seen_at.pop(base):
                del self.seen[t]
        self.buffer = _Buffer()
        return report

    def epsilon(self, flushes: int | None = None) -> float:
        """Privacy spent (ε at the configured δ) after ``flushes`` noised flushes (default: so far)."""
        p, n = self.config.privacy, self.dp_flushes if flushes is None else flushes
        if n not in self._epsilon:
            self._epsilon[n] = epsilon(p.noise_multiplier, n, p.delta)
        return self._epsilon[n]

    @property
    def privacy_spent(self) -> bool:
        """Whether one more flush would spend more than the privacy budget: training stops."""
        p = self.config.privacy
        return p.enabled and p.budget > 0 and self.epsilon(self.dp_flushes + 1) > p.budget

    def _advance_bounds(self, g_max: float) -> None:
        """The finite guard's scalars after a flush whose |g_j| ≤ g_max (``robust.step_bound``)."""
        o = self.config.outer
        self._theta_max += self._next_step(g_max)
        if o.kind == "nesterov":
            self._state_max["m"] = o.momentum * self._state_max["m"] + g_max
        elif o.kind == "fedadam":
            self._state_max["m"] = o.betas[0] * self._state_max["m"] + (1 - o.betas[0]) * g_max

    @torch.no_grad()
    def _robust(self) -> None:
        """Replace the buffer's weighted mean by the configured robust rule, in place: S is set
        to statistic × W on covered elements, so ``flush``'s g = S / W is the statistic."""
        d, kept = self.config.defence, self.buffer.kept
        if not kept:
            return
        if d.rule == "filter":
            self._filter(kept, d.min_cosine)
            return
        updates = [u for u, _, _ in kept]
        layouts = [self._layout(u.plan) for u in updates]
        for n, stat in coordinatewise_stats(updates, [c for _, _, c in kept], layouts, self.S, d.rule, d.trim):
            dim = self._wdim[n]
            W = self.W[n] if dim is None else along(self.W[n], dim, stat.dim())
            self.S[n].copy_(stat * W.float())

    def _filter(self, kept: list[tuple[Update, float, float]], min_cosine: float) -> None:
        """The filter rule: S, W become the weighted sums of the kept updates that
        ``robust.filter_passing`` passes. Its median is taken only over the region some kept
        update covered (``robust_matrix.filter_blocks``), not the whole model: per element the
        statistic is the one a full-model matrix gives, at the cost of the covered region. A
        torch sort of K copies of every whole tensor and a cosine per update had been 44% of the
        server's event loop at 1,000 clients."""
        updates = [u for u, _, _ in kept]
        blocks = filter_blocks(updates, [self._layout(u.plan) for u in updates], self.S)
        passing = filter_passing(blocks, np.array([c for _, _, c in kept], np.float32), min_cosine)
        if passing.all():  # S and W already hold exactly these sums, added in this order
            return
        names = list(dict.fromkeys(n for u, _, _ in kept for n in u.delta))
        torch._foreach_zero_([self.S[n] for n in names])
        torch._foreach_zero_([self.W[n] for n in names])
        for (u, w, c), passes in zip(kept, passing):
            if passes:
                lay = self._layout(u.plan)
                torch._foreach_add_(lay.S, lay.pieces(u.delta), alpha=w * c)
                self._w[lay.windex] += w

    def _divisor(self) -> dict[str, torch.Tensor]:
        """What a flush divides S by, per element: W for the mean; for "add", the largest
        undiscounted weight any one plan put on the element (N_j = max_p T_p, T_p = Σ tokens^a
        over the plan's updates, one scalar over the elements the plan covers)."""
        if self.config.combine != "add":
            return self.W
        N = {n: torch.zeros_like(W) for n, W in self.W.items()}
        for plan, w in self.buffer.plan_w.items():
            lay = self._layout(plan)
            for (n, _), cut in zip(lay.parts, lay.cuts):
                wcut(N[n], cut).clamp_(min=w)
        return N

    def _covered(self, div: dict[str, torch.Tensor]) -> list[tuple[str, int | None, int, int, torch.Tensor]]:
        """The regions some buffered update covered, as (name, dim, start, stop, the divisor
        ``div`` there shaped to broadcast over them): runs of W > 0 along a sliced dimension,
        or a whole tensor (dim None, with its scalar). The runs of every tensor's W are found
        in one pass over W's buffer (``_wgap``): the flush had read each of ~50 small W
        tensors in a few numpy calls of its own."""
        gapped = np.zeros(self._wgap.size + len(self._wnames) + 1, np.int8)
        gapped[self._wgap] = self._w > 0
        step = np.diff(gapped, prepend=np.int8(0))
        starts, stops = np.flatnonzero(step == 1), np.flatnonzero(step == -1)
        tensor = np.searchsorted(self._wgap_start, starts, side="right") - 1
        first = self._wgap_start[tensor]
        out = []
        for t, a, b in zip(tensor.tolist(), (starts - first).tolist(), (stops - first).tolist()):
            n = self._wnames[t]
            dim = self._wdim[n]
            if dim is None:
                out.append((n, None, 0, 0, div[n]))
            elif div is self.W:  # W's views of a run are the same every flush that covers it
                key = (n, a, b)
                view = self._wruns.get(key)
                if view is None:
                    view = self._wruns[key] = along(div[n][a:b], dim, self.S[n].dim())
                out.append((n, dim, a, b, view))
            else:
                out.append((n, dim, a, b, along(div[n][a:b], dim, self.S[n].dim())))
        return out

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat tensors for safetensors and a JSON-able meta dict (with ``seen``: the journal
        knows every id but not which are still inside the window). History tensors are stored
        once per distinct tensor."""
        tensors = {f"weights/{n}": w for n, w in self._weights.items()}
        tensors |= {f"opt/{k}": t for k, t in self.opt_state.items()}
        tensors |= {f"S/{n}": t for n, t in self.S.items()} | {f"W/{n}": t for n, t in self.W.items()}
        for v in sorted(self.history)[:-1]:
            nxt = self.history[v + 1]
            tensors |= {f"hist/{v}/{n}": t for n, t in self.history[v].items() if t is not nxt[n]}
        b = self.buffer
        for i, (u, _, _) in enumerate(b.kept):
            tensors |= {f"kept/{i}/{n}": t for n, t in u.delta.items()}
        meta = {"version": self.version, "history": sorted(self.history), "count": b.count, "tokens": b.tokens,
                "staleness_sum": b.staleness_sum, "paced": b.paced, "pacing": self.pacing, "opened_at": b.opened_at, "task_ids": b.task_ids,
                "seen": self.seen, "g_max": b.g_max, "dp_flushes": self.dp_flushes, "dp_seed": self.dp_seed, "norms": self.norms.state(),
                "kept": [[u.task_id, u.base_version, u.plan.to_json(), u.tokens, w, c] for u, w, c in b.kept],
                "plan_w": [[p.to_json(), w] for p, w in b.plan_w.items()]}
        return tensors, meta

    @classmethod
    def from_state(cls, cfg: Model, config: AggregatorConfig, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any], seen: set[str]) -> "Aggregator":
        """The aggregator ``state()`` described. ``seen``: the task ids journaled up to the
        checkpoint, which must include every id the checkpoint remembers."""
        if not set(meta["seen"]) <= seen:
            raise UserError("the checkpoint remembers task ids the journal lacks: they are not one server's state")
        agg = cls(cfg, versions_in_state(tensors, meta)[meta["version"]], config, meta["version"])
        for group, target in (("opt", agg.opt_state), ("S", agg.S), ("W", agg.W)):
            for k in target:
                target[k].copy_(tensors[f"{group}/{k}"])
        # Rebuilt on the aggregator's own copy so older versions share its tensors (copy-on-write).
        agg.history = versions_in_state(tensors | {f"weights/{n}": w for n, w in agg.weights.items()}, meta)
        kept = [(Update(tid, base, Plan.from_json(plan), {n: t for k, t in tensors.items()
                                                          if k.startswith(f"kept/{i}/") for n in [k.split("/", 2)[2]]},
                        tokens), w, c)
                for i, (tid, base, plan, tokens, w, c) in enumerate(meta.get("kept", []))]
        agg.buffer = _Buffer(meta["count"], meta["tokens"], meta["staleness_sum"], meta["opened_at"],
                             list(meta["task_ids"]), meta.get("g_max", 0.0), kept,
                             {Plan.from_json(p): w for p, w in meta.get("plan_w", [])}, meta.get("paced", meta["count"]))
        agg.seen = dict(meta["seen"])
        for t, base in agg.seen.items():
            agg._seen_at.setdefault(base, []).append(t)
        agg.pace(meta.get("pacing", True))
        agg.norms = NormHistory(config.defence, meta.get("norms"))
        agg.dp_flushes, agg.dp_seed = meta.get("dp_flushes", 0), meta.get("dp_seed", agg.dp_seed)
        agg._state_max = {k: _max_abs(t for name, t in agg.opt_state.items() if name.startswith(f"{k}/"))
                          for k in agg._state_max}
        return agg


def versions_in_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
    """Every kept version's weights from ``state()``'s tensors and meta: the current version's
    are stored whole, each older one only where it differs from the next."""
    current = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("weights/")}
    out = {meta["version"]: current}
    for v in sorted(meta["history"], reverse=True)[1:]:
        out[v] = {n: tensors.get(f"hist/{v}/{n}", t) for n, t in out[v + 1].items()}
    return out


def _norm_key(plan: Plan) -> str:
    """Whose norm history an update joins: its tier's plan (the name is the tier's, the hash
    the submodel's). Tiers do different work on the same submodel (a GPU node's 10 warm AdamW
    steps at batch 8, a Jetson's 4 fresh ones at batch 4, both on the full model), so a pool
    shared by plan alone would hold the nodes to the devices' size, the most numerous."""
    return f"{plan.name}/{plan.hash}"


def _max_abs(tensors) -> float:
    return max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
