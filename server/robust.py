"""Defences for the asynchronous buffer: pure math, no I/O, no aggregator state of its own
beyond the norm history it is handed.

**Norm bound.** Every update is clipped (or refused) to a bound before it enters the buffer.
The bound is a multiple of the median norm of the last ``window`` accepted updates of the same
tier's plan (the aggregator keys the history by the plan's name, its tier, and its hash), per
element (RMS = ‖Δ‖/√n), times √n of the update's plan, divided by (1 + τ)^½: a stale update was
computed against an older model and gets less room, never more. Until a plan has
``min_history`` updates of its own, only the absolute bound (when set) limits it: plans are
different work (a GPU node's ten warm AdamW steps over the whole model, a phone's four fresh
ones over a slice), so another plan's norms say nothing about what is normal for this one.
Borrowing them had clipped the GPU nodes' first updates to the phones' size, and since the
clipped norms then became the nodes' own history, held them there: a federation whose devices
sent near-zero updates never left its initial loss (issue 11). A new plan's first few updates
are still filtered by the robust rule and capped by the finite guard. An absolute bound from
the federation file, when set, caps every update too. Clipping is folded into the
update's weight in the buffer (S += w·c·Δ, W += w), so it costs no pass over the update beyond
the norm itself, and the per-element coverage rule stays exact. The history records the
*clipped* norms, so an attacker cannot ratchet the median upward while fewer than half of a
window's updates are his.

**Finite guard.** ``step_bound`` bounds, from scalars alone, how far the next flush can move
any element given the largest buffered (clipped) norm and the outer optimizer's state; the
aggregator refuses an update that would let the next version leave float32's finite range,
so the buffer survives without it, and checks the version it publishes as well.

**Robust rules.** Coordinate-wise over the updates that covered each element (the coverage
rule of ``server.aggregator`` stays exact: an element's statistic sees only its own trainers):
``trimmed`` drops the ⌊β·n_j⌋ largest and smallest of the n_j values at element j and averages
the rest; ``median`` takes their median (the mean of the two middle values when n_j is even,
as numpy's). ``filter`` drops whole updates whose cosine similarity with the coordinate-wise
median (over the elements they cover) is below a threshold, then takes the usual weighted mean
of the rest. These rules are unweighted (as Flower's FedMedian and FedTrimmedAvg): tokens and
staleness no longer weigh an update, which costs some accuracy when work is unequal.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from stamen.core.errors import UserError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
SAFE_MAX = FLOAT32_MAX / 16  # a version element may not be able to grow past this
RULES = ("mean", "trimmed", "median", "filter")
NORM_MODES = ("clip", "refuse", "off")


@dataclass(frozen=True)
class DefenceConfig:
    norm_bound: str = "clip"  # "clip", "refuse" or "off"
    norm_multiple: float = 3.0  # bound = multiple × median recent norm (per element, × √n)
    norm_window: int = 64  # accepted updates per plan remembered
    norm_min_history: int = 4  # fewer than this of a plan's own: no history bound yet (norm_absolute only)
    norm_absolute: float = 0.0  # a cap on ‖Δ‖ whatever the history (0: none)
    rule: str = "filter"  # "mean", "trimmed", "median" or "filter"; central DP needs "mean"
    trim: float = 0.2  # trimmed: the share cut from each end at every element
    min_cosine: float = 0.0  # filter: updates less aligned with the median than this are dropped

    def __post_init__(self) -> None:
        if self.norm_bound not in NORM_MODES:
            raise UserError(f"norm_bound {self.norm_bound!r}: use one of {', '.join(NORM_MODES)}")
        if self.rule not in RULES:
            raise UserError(f"rule {self.rule!r}: use one of {', '.join(RULES)}")
        if not (self.norm_multiple > 0 and self.norm_window >= 1 and self.norm_min_history >= 1
                and self.norm_absolute >= 0):
            raise UserError("norm_multiple must be positive, norm_window and norm_min_history at least 1, "
                            "norm_absolute >= 0")
        if not 0 <= self.trim < 0.5:
            raise UserError(f"trim must be in [0, 0.5), got {self.trim}")
        if not -1 <= self.min_cosine <= 1:
            raise UserError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")


class NormHistory:
    """Recent accepted norms per plan, as RMS per element; checkpointed with the aggregator."""

    def __init__(self, config: DefenceConfig, state: dict[str, list[float]] | None = None) -> None:
        self.config = config
        self.rms = {k: deque(v, maxlen=config.norm_window) for k, v in (state or {}).items()}
        # each plan's window kept sorted too, so a bound (asked twice per update) reads its
        # median instead of sorting the window again
        self._sorted = {k: sorted(v) for k, v in self.rms.items()}

    def bound(self, plan: str, numel: int, staleness: int) -> float:
        """The norm bound for an update of ``plan`` (``numel`` elements) at staleness τ, or inf."""
        c = self.config
        own = self._sorted.get(plan, ())
        bound = math.inf
        if len(own) >= c.norm_min_history:
            bound = c.norm_multiple * _median(own) * math.sqrt(numel) / math.sqrt(1 + staleness)
        if c.norm_absolute > 0:
            bound = min(bound, c.norm_absolute)
        return bound

    def record(self, plan: str, norm: float, numel: int) -> None:
        window = self.rms.setdefault(plan, deque(maxlen=self.config.norm_window))
        ordered = self._sorted.setdefault(plan, [])
        if len(window) == window.maxlen:
            del ordered[bisect.bisect_left(ordered, window[0])]
        window.append(norm / math.sqrt(numel))
        bisect.insort(ordered, window[-1])

    def state(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.rms.items()}


def _median(ordered: list[float]) -> float:
    """The median of sorted values, as ``statistics.median`` computes it."""
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def square(t: torch.Tensor) -> float:
    """A tensor's sum of squares: one float32 BLAS dot over its values (in numpy: a torch op
    costs ~10 µs of dispatch, several per tensor, on the server's hot path; what the wire decoder
    computes for each tensor it decodes, ``compression.codecs.decode``: the same call on the
    same memory, so the same number)."""
    a = (t if t.dtype == torch.float32 else t.float()).detach().numpy().reshape(-1)
    return float(np.dot(a, a))


def norm_of(squares: list[float]) -> float:
    """‖Δ‖₂ from its tensors' sums of squares (``square``), added in float64 in the order given;
    inf when a float32 partial overflowed (an update whose values are finite but whose squares
    are not is absurd anyway)."""
    total = 0.0
    for q in squares:
        total += q
    return math.sqrt(total)


def step_bound(kind: str, lr: float, momentum: float, betas: tuple[float, float], eps: float,
               g_max: float, state_max: dict[str, float]) -> float:
    """An upper bound on |lr · d_j| for the next flush, from scalars: ``g_max`` bounds every
    |g_j| (a weighted mean of clipped updates is bounded by their largest norm) and
    ``state_max[k]`` every |k_j| of the optimizer state. Follows ``server.outer`` op for op:
    nesterov m' = μm + g, d = g + μm'; fedadam m' = β1 m + (1−β1) g, d = m'/(√v' + ε) ≤ |m'|/ε."""
    if kind == "fedavg":
        return lr * g_max
    if kind == "nesterov":
        m = momentum * state_max.get("m", 0.0) + g_max
        return lr * (g_max + momentum * m)
    b1 = betas[0]
    return lr * (b1 * state_max.get("m", 0.0) + (1 - b1) * g_max) / eps


def coordinatewise(values: torch.Tensor, rule: str, trim: float, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``values``: (k, ...) with NaN where update i did not cover the element. Returns the
    rule's statistic per element (0 where nobody covered it) and the covering count n_j.
    In numpy: its sort (vectorised, NaN last) is several times faster than torch's or than a
    partition for the short columns of a buffer, and it runs on one thread. ``overwrite``:
    sort ``values`` in place (a caller's scratch copy) instead of a copy of them."""
    x = values.numpy()
    if overwrite:  # a column's NaN count is the same sorted
        x.sort(axis=0)
        ordered = x
    else:
        ordered = np.sort(x, axis=0)  # NaN sorts last, so rank r < n_j is a real value
    k = x.shape[0]
    if rule == "median" and k and not np.isnan(ordered[-1]).any():
        # Every update covered every element (a buffer of one plan): the middle ranks are the
        # same for every column, rows of the sorted matrix rather than gathers (the same values).
        lo, hi = (k - 1) // 2, k // 2
        stat = ordered[lo] if lo == hi else (ordered[lo] + ordered[hi]) / np.float32(2)
        return torch.from_numpy(np.array(stat, dtype=np.float32)), torch.full(x.shape[1:], k, dtype=torch.int64)
    n = (~np.isnan(x)).sum(0)
    if rule == "median":  # the middle value, or the mean of the two middle ones (as numpy's median)
        lo, hi = (np.maximum(n - 1, 0) // 2)[None], (n // 2)[None]
        a, b = np.take_along_axis(ordered, lo, 0)[0], np.take_along_axis(ordered, np.minimum(hi, x.shape[0] - 1), 0)[0]
        with np.errstate(invalid="ignore", over="ignore"):
            stat = np.where(lo[0] == hi[0], a, (a + b) / np.float32(2))
        stat = np.where(n > 0, stat, np.float32(0))
    elif rule == "trimmed":
        cut = np.floor(trim * n).astype(np.int64)
        rank = np.arange(x.shape[0]).reshape(-1, *[1] * (x.ndim - 1))
        keep = (rank >= cut) & (rank < n - cut)  # ranks in [cut, n - cut): real values only
        stat = np.where(keep, ordered, np.float32(0)).sum(0, dtype=np.float32) / np.maximum(keep.sum(0), 1)
    else:
        raise ValueError(rule)
    return torch.from_numpy(np.asarray(stat, dtype=np.float32)), torch.from_numpy(np.asarray(n, dtype=np.int64))


def full_median(x: np.ndarray, overwrite: bool = True) -> np.ndarray:
    """The median of each column of ``x`` (k, M), float32 with no NaN: ``coordinatewise``'s
    median of a matrix every update covered, the same values, a zero's sign aside (which no
    cosine of ``filter_passing`` can tell). Sorted in place. A column whose two middle ranks
    both fall among its zeros (at most the lower middle rank of its values below 0, more than
    the upper one at or below 0) has median 0 without a sort: a top-k codec's updates keep a
    few percent of each tensor's elements, so those are most of a buffer's columns, and sorting
    them had been most of a flush (K = 50 phone updates: ~80% of the filter's time).
    ``overwrite`` False: ``x`` is left as it is (a whole sort then sorts a copy)."""
    k = x.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    count = np.uint16 if k < 1 << 16 else np.int64  # rows of bools summed in a narrow type: ~3x faster than count_nonzero
    rest = np.flatnonzero(((x < 0).sum(0, dtype=count) > lo) | ((x <= 0).sum(0, dtype=count) <= hi))
    if 2 * rest.size > x.shape[1]:  # mostly real medians: one sort of the whole matrix
        if overwrite:
            x.sort(axis=0)
        else:
            x = np.sort(x, axis=0)
        return np.array(x[lo] if lo == hi else (x[lo] + x[hi]) / np.float32(2), dtype=np.float32)
    out = np.zeros(x.shape[1], np.float32)
    if rest.size:
        sub = x[:, rest]
        sub.sort(axis=0)
        out[rest] = sub[lo] if lo == hi else (sub[lo] + sub[hi]) / np.float32(2)
    return out


FILTER_BLOCK = 1 << 22  # elements (K × columns) of the matrix the filter holds and works on at once


def filter_passing(blocks: Iterable[np.ndarray], clips: np.ndarray, min_cosine: float) -> np.ndarray:
    """The filter rule's verdict on each of K updates. ``blocks`` are the (K, M) float32 matrix
    in column blocks, in order: row i update i's values, NaN where it did not cover an element;
    ``clips`` its clipping factors. Row i passes when its cosine with the coordinate-wise median
    of the clipped rows, both over the elements update i covers, is at least ``min_cosine``.

    The median is per column and the cosine's three sums per row add over columns, so the matrix
    is taken FILTER_BLOCK elements at a time: memory is bounded whatever K × M is. (Whole, its
    float64 copies made a flush of K = 2,500 device updates of gpt-tiny's top two blocks beside
    the GPU nodes' whole-model ones take 22 GiB, bench/simulator_scale.py.) Within a block the
    sums come from one matrix product in float64, and a block no update left uncovered takes no
    masks, which gives the same sums bit for bit; a matrix of one block gives the sums of the
    whole rows."""
    k = len(clips)
    xm, xx, cc = np.zeros(k), np.zeros(k), np.zeros(k)
    step = max(1, FILTER_BLOCK // max(k, 1))
    unclipped = bool((clips == 1).all())  # x · 1 is x: no scaled copy of the matrix to make
    for block in blocks:
        for c in range(0, block.shape[1], step):
            raw = block[:, c:c + step]
            missing = np.isnan(raw)
            if not missing.any():
                m = (full_median(raw, overwrite=False) if unclipped else full_median(raw * clips[:, None])).astype(np.float64)
                x = raw.astype(np.float64)
                # every row's centre is the whole median: its sum, taken once (over two broadcast
                # rows, which einsum sums exactly as it sums each of K)
                centres = np.broadcast_to(m, (min(k, 2), m.size))
                cc += np.einsum("ij,ij->i", centres, centres)[0]
            else:
                covered = ~missing
                m = coordinatewise(torch.from_numpy(raw * clips[:, None]), "median", 0.0, overwrite=True)[0].numpy()
                m = m.astype(np.float64)
                x = np.where(covered, raw, 0).astype(np.float64)
                centres = np.where(covered, m, 0)  # row i: the median over update i's elements
                cc += np.einsum("ij,ij->i", centres, centres)
            xx += np.einsum("ij,ij->i", x, x)
            xm += x @ m
    denom = np.sqrt(xx * cc)
    cos = np.divide(xm, denom, out=np.zeros(k), where=denom > 0)
    return cos >= min_cosine
