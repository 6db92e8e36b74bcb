"""How a plan's delta lands in the aggregator's model-shaped buffers: the geometry of width
cuts, with no state of its own (the aggregator caches one ``Layout`` per plan).

A plan covers a tensor either whole or along exactly one dimension, and that dimension is the
same for every plan (``weight_dims``; see ``core.plan``); along it a width cut keeps a prefix of
each of g equal groups (``Cut``). So a plan's part of a tensor is one strided view
(``prefix_view``), its part of the per-slice weight vector W another (``wcut``), and the
regions several plans cover nest (the widest one's prefix holds the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stamen.core.lora import LoraSpace
from stamen.core.model import GPTConfig
from stamen.core.plan import Model, Plan, full_plan, global_shapes

Cut = tuple[int, int, int]  # (dim, groups g, kept prefix k) along one dimension of a tensor


@dataclass(frozen=True)
class Layout:
    """How one plan's delta lands in the buffer, built once per plan: one view of S per delta
    tensor, and the elements of W it covers. A width cut keeps a prefix of each of g equal
    groups along one dimension (g = 1 for MLP units, 3 for c_attn's q|k|v rows), so with that
    dimension seen as (g, group) the kept part of S is a single strided view, and the delta,
    seen as (g, prefix), lands in it with one add: the whole update is one fused
    ``_foreach_add_``, and its weight one numpy add over ``windex``."""

    shapes: dict[str, tuple[int, ...]]
    parts: list[tuple[str, tuple[int, ...] | None]]  # (name, shape to view the delta as, or None: as is)
    cuts: list[Cut | None]  # per part: (dim, groups g, kept prefix k), None: whole
    S: list[torch.Tensor]
    numel: int
    windex: np.ndarray  # the elements of the aggregator's W buffer the plan covers (its parts' W views)

    @classmethod
    def build(cls, plan: Plan, cfg: Model, S: dict[str, torch.Tensor], W: dict[str, torch.Tensor],
              wsize: int) -> "Layout":
        """``plan``'s layout over the buffer S and the weight vectors W, views of one float64
        buffer of ``wsize`` elements. Raises ValueError for a cut that is not a prefix of each
        of g equal groups."""
        sl, shapes, names = plan.slices(cfg), plan.shapes(cfg), plan.trainable(cfg)
        parts: list[tuple[str, tuple[int, ...] | None]] = []
        cuts: list[Cut | None] = []
        Sv: list[torch.Tensor] = []
        Wv: list[torch.Tensor] = []
        for n in names:
            if sl[n] is None:
                parts.append((n, None))
                cuts.append(None)
                Sv.append(S[n])
                Wv.append(W[n])
                continue
            dim, pos = sl[n]
            size = S[n].shape[dim]
            kept = torch.zeros(size, dtype=torch.bool)
            kept[pos] = True
            found = runs(kept.numpy())
            g, k = len(found), found[0][1] - found[0][0]
            if size % g or found != [(i * (size // g), i * (size // g) + k) for i in range(g)]:
                raise ValueError(f"{n}: plan {plan.name!r} keeps {found}, not a prefix of each of {g} equal groups")
            parts.append((n, None if g == 1 else shapes[n][:dim] + (g, k) + shapes[n][dim + 1:]))
            cuts.append((dim, g, k))
            Sv.append(prefix_view(S[n], dim, g, k))
            Wv.append(wcut(W[n], (dim, g, k)))
        numel = sum(math.prod(shapes[n]) for n in names)
        at = torch.arange(wsize)  # each W element's place in the buffer, seen as W's views see it
        windex = torch.cat([at.as_strided(w.shape, w.stride(), w.storage_offset()).reshape(-1) for w in Wv]).numpy()
        return cls({n: shapes[n] for n in names}, parts, cuts, Sv, numel, windex)

    def pieces(self, delta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [delta[n] if shape is None else delta[n].reshape(*shape) for n, shape in self.parts]  # ints parse faster than a tuple

    def views(self, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The plan's parts of global-shaped tensors (as S's views are of S)."""
        return [full[n] if cut is None else prefix_view(full[n], *cut) for (n, _), cut in zip(self.parts, self.cuts)]


def prefix_view(t: torch.Tensor, dim: int, g: int, k: int) -> torch.Tensor:
    """The prefix k of each of g equal groups along ``dim``, as one view."""
    if g == 1:
        return t.narrow(dim, 0, k)
    return t.unflatten(dim, (g, t.shape[dim] // g)).narrow(dim + 1, 0, k)


def wcut(W: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    """A plan's part of a weight vector W along its sliced dimension (all of a scalar W)."""
    if cut is None:
        return W
    _, g, k = cut
    return W.view(g, W.shape[0] // g)[:, :k]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The maximal runs of True in a 1-d mask as (start, stop): [1 1 0 0 1] → [(0, 2), (4, 5)];
    a mask all one way takes one or two calls. (A flush finds the runs of every tensor's W at
    once, ``Aggregator._covered``.)"""
    if not mask.any():
        return []
    if mask.all():
        return [(0, mask.size)]
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=np.int8(0), append=np.int8(0))).tolist()
    return list(zip(edges[::2], edges[1::2]))


def along(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A 1-d tensor shaped to broadcast along dimension ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def weight_dims(cfg: Model) -> dict[str, int | None]:
    """Per global tensor, the one dimension width cuts slice (None if none does), read off the
    narrowest possible plan: every width plan slices the same dimension of a given tensor. In a
    LoRA adapter, rank plans slice A's rows and B's columns."""
    if isinstance(cfg, LoraSpace):
        return dict(cfg.rank_dims)
    if not isinstance(cfg, GPTConfig):
        return {n: None for n in global_shapes(cfg)}
    narrow = Plan("narrowest", full_plan(cfg).blocks, 1e-9)
    return {n: (sl[0] if sl is not None else None) for n, sl in narrow.slices(cfg).items()}
