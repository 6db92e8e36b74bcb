"""The robust rules' matrices of the buffer's kept updates: each update placed where its plan
puts it in the model's tensors, NaN where it did not cover an element, so a rule of
``server.robust`` sees per element only the updates that trained it (the coverage rule).

The aggregator keeps the K updates of a buffer under a robust rule and, at the flush, hands
them here with their layouts (``server.layout``: how a plan's delta lands in the model's
tensors) and the model's global-shaped tensors (read for their order and shapes only). For the
coordinate-wise rules the matrix is one (K, *shape) stack per tensor (``coordinatewise_stats``);
for the filter it is the (K, M) matrix over the region the plans covered, in column blocks
(``filter_blocks``) for ``robust.filter_passing``. Pure: nothing here holds state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from stamen.core.records import Update
from stamen.server.layout import Cut, Layout, prefix_view
from stamen.server.robust import FILTER_BLOCK, coordinatewise


def coordinatewise_stats(updates: list[Update], clips: list[float], layouts: list[Layout], model: dict[str, torch.Tensor],
                         rule: str, trim: float) -> Iterator[tuple[str, torch.Tensor]]:
    """Per tensor some update trained, in the updates' order, the coordinate-wise ``rule``
    (``robust.coordinatewise``) over the clipped updates (update i times ``clips[i]``) that
    covered each element. ``layouts[i]``: update i's plan's layout (its ``views`` of
    global-shaped tensors and ``pieces`` of its delta); ``model``: global-shaped tensors."""
    names = list(dict.fromkeys(n for u in updates for n in u.delta))
    values = {}
    for n in names:  # (k, *shape), NaN where update i did not cover the element
        values[n] = torch.full((len(updates), *model[n].shape), math.nan)
    for i, (u, c, lay) in enumerate(zip(updates, clips, layouts)):
        torch._foreach_copy_(lay.views({n: values[n][i] for n in u.delta}), lay.pieces(u.delta))
        torch._foreach_mul_(lay.views({n: values[n][i] for n in u.delta}), c)
    for n in names:
        yield n, coordinatewise(values[n], rule, trim)[0]


def filter_blocks(updates: list[Update], layouts: list[Layout], model: dict[str, torch.Tensor]) -> Iterator[np.ndarray]:
    """The filter rule's (K, M) float32 matrix in column blocks, for ``robust.filter_passing``:
    row i is update i over the union of the regions the kept updates cover, NaN where it did
    not cover an element. Plans cut a tensor along the same dimension in the same groups, so
    their regions nest and the union is the widest one's prefix (``_union``). Columns run
    through the tensors in the model's order, each region in row-major order, so an update's
    covered columns, in order, are its pieces flattened in order.

    A block is a run of whole tensors of at most ``FILTER_BLOCK`` elements (a larger tensor
    alone), filled only when it is taken: the matrix is never whole in memory (at K = 2,500
    device updates of gpt-tiny it would be 2.2 GiB). ``layouts[i]``: update i's plan's layout
    (its ``parts`` and ``cuts``); ``model``: global-shaped tensors in the model's order."""
    # per distinct layout (a buffer's K updates share a few plans), then per update
    distinct = {id(lay): lay for lay in layouts}
    cut_of = {i: dict(zip((n for n, _ in lay.parts), lay.cuts)) for i, lay in distinct.items()}
    view_of = {i: dict(lay.parts) for i, lay in distinct.items()}  # a part's delta as its layout views it
    cuts, views = [cut_of[id(lay)] for lay in layouts], [view_of[id(lay)] for lay in layouts]
    names = [n for n in model if any(n in c for c in cut_of.values())]
    union = {n: _union([c[n] for c in cut_of.values() if n in c]) for n in names}
    shapes = {n: (model[n] if union[n] is None else prefix_view(model[n], *union[n])).shape for n in names}
    runs: list[list[str]] = []
    room = 0
    for n in names:
        size = len(updates) * math.prod(shapes[n])
        if not runs or size > room:
            runs.append([])
            room = FILTER_BLOCK
        runs[-1].append(n)
        room -= size
    return (_filter_block(updates, cuts, views, run, union, shapes) for run in runs)


def _filter_block(updates: list[Update], cuts: list[dict], views: list[dict],
                  run: list[str], union: dict, shapes: dict) -> np.ndarray:
    """The columns of tensors ``run`` of ``filter_blocks``'s matrix."""
    sizes = [math.prod(shapes[n]) for n in run]
    # the rows that are a decoder's buffer: the whole row's tensors, end to end in this order
    whole = {i: all(cut.get(n, False) == union[n] for n in run)  # per distinct layout
             for i, cut in {id(cut): cut for cut in cuts}.items()}
    names = tuple(run)
    flat = [u.flat is not None and whole[id(cut)] and tuple(u.delta) == names for u, cut in zip(updates, cuts)]
    if all(flat):  # one stack of them instead of a NaN fill and a copy per row
        raw = np.empty((len(updates), sum(sizes)), np.float32)
        torch.stack([u.flat for u in updates], out=torch.from_numpy(raw))
        return raw
    raw = np.full((len(updates), sum(sizes)), np.nan, np.float32)
    values = torch.from_numpy(raw)  # torch views of it, to place each update's pieces
    region = {n: r.view(len(updates), *shapes[n]) for n, r in zip(run, values.split(sizes, dim=1))}
    for i, (u, cut, view) in enumerate(zip(updates, cuts, views)):
        mine = [n for n in run if n in cut]
        if len(mine) == len(run) and all(cut[n] == union[n] for n in run):  # it covers the whole row
            if flat[i]:
                values[i].copy_(u.flat)
            else:
                torch.cat([u.delta[n].reshape(-1) for n in run], out=values[i])  # a piece flattens as its delta
        elif mine:
            torch._foreach_copy_([_within(region[n][i], union[n], cut[n]) for n in mine],
                                 [u.delta[n] if view[n] is None else u.delta[n].reshape(view[n]) for n in mine])
    return raw


def _union(cuts: list[Cut | None]) -> Cut | None:
    """The cut covering every one of ``cuts`` (one tensor's, from several plans): the widest
    prefix, or the whole tensor (None) if one plan takes it whole."""
    if any(c is None for c in cuts) or len({c[:2] for c in cuts}) > 1:
        return None
    return cuts[0][0], cuts[0][1], max(c[2] for c in cuts)


def _within(region: torch.Tensor, union: Cut | None, cut: Cut | None) -> torch.Tensor:
    """A plan's part (``cut``, shaped as a layout's ``pieces`` shapes its delta) of a tensor's
    ``union`` region (shaped as ``prefix_view`` shapes it)."""
    if union is None:
        return region if cut is None else prefix_view(region, *cut)
    dim, g, _ = union
    return region.narrow(dim if g == 1 else dim + 1, 0, cut[2])
