"""Codecs over a dict of named tensors: what a client uploads and what a server sends down.

Each tensor is flattened and encoded into a few typed parts (``stamen.core.wire`` frames them):

- ``fp32`` / ``fp16`` / ``bf16``: the values, cast (fp16 saturates at ±65504 instead of
  turning into infinity).
- ``int8`` / ``int4``: symmetric blockwise quantization, one fp32 absmax scale per ``block``
  elements (a per-tensor scale zeroes most of a real delta, see REFERENCES.md); int4 packs two
  values per byte. Error per element is at most half a step, ``absmax_block / (2 * qmax)``.
- ``topk``: the largest-magnitude fraction of each matrix, as delta-coded ascending indices
  (the smallest unsigned dtype that holds the largest gap) plus the kept values, which go
  through the value codec. Vectors and scalars (norm gains, biases) go whole through the value
  codec: they are a sliver of the bytes (1.5 % of gpt-tiny, 0.3 % of gpt-small) but dropping
  98 % of a norm gain's update is what cost most of top-k's model quality (bench/quality.py,
  outer step 1, seeds 0-3: +5.8 % → +2.2 % validation loss against fp32). The receiver tells
  the two apart by shape. ``exact`` keeps exactly k; ``sample`` keeps about k, faster;
  ``chunk=C`` keeps the top fraction of every C elements (the receiver needs no chunk size:
  the indices say where the values go).
- ``zstd``: the whole body, in the frame.

All arithmetic is vectorized numpy over the flat tensor: no Python loop touches elements.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from stamen.compression.spec import CodecSpec, TopK, Values, parse
from stamen.core.errors import UserError
from stamen.core.wire import (PART_DTYPES, Frame, Limits, Table, TensorRecord, WireError, check_values, encode_frame,
                              read_frame)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FP16_MAX = 65504.0
SAMPLE = 1 << 16
QMAX = {"int8": 127, "int4": 7}


class BadCodec(WireError):
    """The frame names a codec chain this code cannot parse."""


class MalformedPayload(WireError):
    """The parts do not fit the codec: wrong count or dtype, indices out of order or range."""


@dataclass
class Payload:
    kind: str
    codec: str
    meta: dict
    tensors: dict[str, torch.Tensor]
    # each float32 tensor's sum of squares in float32 (one BLAS dot over its values), where the
    # decoder computed it already: the aggregator's norm (``Aggregator.measure``) reuses it
    squares: dict[str, float] = field(default_factory=dict)
    # every tensor's float32 values end to end in frame order (``tensors`` are its views), when
    # every tensor is float32; None otherwise
    flat: np.ndarray | None = None


def _as_spec(spec: str | CodecSpec) -> CodecSpec:
    return spec if isinstance(spec, CodecSpec) else parse(spec)


def to_numpy(name: str, t: torch.Tensor) -> np.ndarray:
    """A tensor as flat float32 numpy (a view for float32). The codecs compute in numpy: its
    big-array ops run on one thread, while torch's thread pool stalls for milliseconds per op
    when the cores are shared, which dominated the encode time of a 76-tensor model."""
    if t.dtype not in DTYPES.values():
        raise UserError(f"tensor {name!r} has dtype {t.dtype}; codecs take float32, float16 or bfloat16")
    t = t.detach().cpu().reshape(-1)
    if t.dtype == torch.bfloat16:
        return bf16_to_f32(t.view(torch.int16).numpy().view(np.uint16))
    return t.numpy().astype(np.float32, copy=False)


def from_numpy(x: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat float32 numpy back to a tensor of ``dtype`` and ``shape``."""
    if dtype == "bfloat16":
        return torch.from_numpy(_bf16(x).view(np.int16)).view(torch.bfloat16).view(shape)
    return torch.from_numpy(_f16(x, torch.float16) if dtype == "float16" else x).view(shape)


def _f16(x: np.ndarray, to: torch.dtype) -> np.ndarray:
    """float16 <-> float32 through torch, which uses the CPU's F16C instructions; numpy's
    software cast runs at ~40 MB/s on the subnormals that small deltas are full of."""
    return torch.from_numpy(x).to(to).numpy()


def _bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of float32 values, through torch: round to nearest even."""
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---- value codecs: n values <-> parts --------------------------------------------------------

def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    pad = -x.size % block
    return (np.concatenate([x, np.zeros(pad, x.dtype)]) if pad else x).reshape(-1, block)


def _encode_values(v: Values, x: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    if v.name == "fp32":
        return [x], ["float32"]
    if v.name == "fp16":
        return [_f16(np.clip(x, -FP16_MAX, FP16_MAX), torch.float16)], ["float16"]
    if v.name == "bf16":
        return [_bf16(x)], ["bfloat16"]
    xb = _blocks(x, v.block)
    # |x| as the float's bits without the sign: an integer max is several times faster than a
    # float one, orders non-negative floats the same, and a NaN still wins (and poisons the scale).
    absmax = (xb.view(np.int32) & np.int32(0x7FFFFFFF)).max(axis=1, initial=0).view(np.float32)
    scale = absmax / np.float32(QMAX[v.name])
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    with np.errstate(invalid="ignore"):  # a NaN/inf block keeps a non-finite scale; receivers reject it
        q = np.rint(np.multiply(xb, inv[:, None])).astype(np.int8)
    if v.name == "int4":
        u = (q.reshape(-1, 2) + np.int8(8)).view(np.uint8)
        return [u[:, 0] | (u[:, 1] << np.uint8(4)), scale], ["uint8", "float32"]
    return [q.reshape(-1), scale], ["int8", "float32"]


def _expected_parts(v: Values, n: int) -> list[tuple[str, int]]:
    """(dtype, count) of each part the value codec writes for n values."""
    if v.name in ("fp32", "fp16", "bf16"):
        return [({"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[v.name], n)]
    nblocks = -(-n // v.block)
    return [("uint8" if v.name == "int4" else "int8", nblocks * v.block // (2 if v.name == "int4" else 1)),
            ("float32", nblocks)]


def _decode_values(v: Values, first: np.ndarray, scales: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The float32 values of several tensors' parts (already checked against
    ``_expected_parts``), end to end: ``first`` is every tensor's first value part, one after
    another, and ``scales`` the quantizers' second parts likewise, decoded in one call. The
    arithmetic is elementwise (a block's scale lies in its own tensor's parts), so each value is
    what decoding its tensor alone gives; ``keep`` cuts the quantizers' block padding
    (``_Layout``)."""
    if v.name == "fp32":
        return first.astype(np.float32, copy=False)
    if v.name == "fp16":
        return _f16(first, torch.float32)
    if v.name == "bf16":
        return bf16_to_f32(first)
    q = first
    if v.name == "int4":
        q = (np.stack((q & np.uint8(15), q >> np.uint8(4)), axis=1).view(np.int8) - np.int8(8))
    x = np.multiply(q.reshape(-1, v.block), scales[:, None], dtype=np.float32).reshape(-1)
    return x if keep is None else x[keep]


def _segment_positions(lengths: list[int]) -> np.ndarray:
    """Each element's position inside its own segment, for segments of ``lengths`` end to end:
    [2, 3] → [0 1 0 1 2]."""
    starts = np.cumsum([0] + lengths[:-1], dtype=np.int64)
    return np.arange(sum(lengths), dtype=np.int64) - np.repeat(starts, lengths)


# ---- top-k -----------------------------------------------------------------------------------

def _keep_count(fraction: float, n: int) -> int:
    """How many of n elements a top-k keeps: the fraction, rounded, at least one (none of none)."""
    return min(n, max(1, round(fraction * n)))


def select_chunked(x: np.ndarray, fraction: float, chunk: int) -> np.ndarray:
    """Ascending int64 indices of the top ``fraction`` (at least one) of every ``chunk``
    consecutive elements of flat ``x`` by magnitude; a short last chunk keeps its own share.
    One argpartition over the (chunks, chunk) matrix does all full chunks at once."""
    mag = np.abs(x)
    full = x.size // chunk * chunk
    out = []
    if full:
        count = _keep_count(fraction, chunk)
        rows = mag[:full].reshape(-1, chunk)
        top = np.sort(np.argpartition(rows, chunk - count, axis=1)[:, chunk - count:], axis=1)
        out.append((top + np.arange(0, full, chunk)[:, None]).reshape(-1))
    if full < x.size:
        count = _keep_count(fraction, x.size - full)
        out.append(full + np.sort(np.argpartition(mag[full:], x.size - full - count)[x.size - full - count:]))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def select_topk(x: np.ndarray, k: TopK) -> np.ndarray:
    """Ascending int64 indices of the largest-magnitude entries of flat ``x``.

    Both selections first cut at a threshold read off a seeded sample of magnitudes, which
    is one fast vectorized pass. ``sample`` keeps what passes a cut at the k-th quantile
    (about k). ``exact`` cuts lower, at about 2k candidates, and partitions only those; when
    the sample misjudged and fewer than k pass, it partitions the whole tensor."""
    if k.chunk is not None:
        return select_chunked(x, k.fraction, k.chunk)
    n = x.size
    count = _keep_count(k.fraction, n)
    if count == 0:
        return np.zeros(0, np.int64)
    mag = np.abs(x)
    if n > 4 * SAMPLE and count < n // 2:
        sample = mag[np.random.default_rng(k.seed).integers(0, n, SAMPLE)]
        share = count / n if k.select == "sample" else 2 * count / n
        cand = np.flatnonzero(mag >= np.quantile(sample, 1.0 - share))
        if k.select == "sample":
            return cand
        if cand.size >= count:
            return np.sort(cand[np.argpartition(mag[cand], cand.size - count)[cand.size - count:]])
    return np.sort(np.argpartition(mag, n - count)[n - count:])


def sparse(spec: CodecSpec, shape: tuple[int, ...]) -> bool:
    """Whether ``spec`` sends a tensor of ``shape`` as top-k indices + values: matrices only."""
    return spec.topk is not None and len(shape) >= 2


def _index_part(idx: np.ndarray, n: int) -> tuple[np.ndarray, str]:
    if n > 2**32:
        raise UserError(f"topk takes tensors of at most 2**32 elements, got {n}")
    gaps = np.diff(idx, prepend=0)
    top = int(gaps.max()) if gaps.size else 0
    dtype = next(d for d, limit in (("uint8", 255), ("uint16", 65535), ("uint32", 2**32 - 1)) if top <= limit)
    return gaps.astype(dtype), dtype


INDEX_DTYPES = ("uint8", "uint16", "uint32")


# ---- whole payloads --------------------------------------------------------------------------

def compress(tensors: dict[str, torch.Tensor], spec: str | CodecSpec, kind: str = "update",
             meta: dict | None = None) -> Frame:
    """Encode every tensor into its parts (not yet bytes: ``encode_frame`` makes the bytes,
    ``reconstruct`` shows what the receiver will get, which error feedback needs)."""
    spec = _as_spec(spec)
    records = []
    for name, t in tensors.items():
        x = to_numpy(name, t)
        dtype = str(t.dtype).removeprefix("torch.")
        if not sparse(spec, t.shape):
            parts, dtypes = _encode_values(spec.values, x)
        else:
            idx = select_topk(x, spec.topk)
            gaps, gap_dtype = _index_part(idx, x.size)
            parts, dtypes = _encode_values(spec.values, x[idx])
            parts, dtypes = [gaps] + parts, [gap_dtype] + dtypes
        records.append(TensorRecord(name, dtype, tuple(t.shape), parts, dtypes))
    return Frame(kind, str(spec), dict(meta or {}), records)


@functools.lru_cache(maxsize=64)
def _spec(codec: str) -> CodecSpec:
    try:
        return parse(codec)
    except UserError as e:
        raise BadCodec(f"frame codec {codec!r}: {e}") from None


# A frame's tensors as (name, dtype, shape, ((part dtype, count, byte offset in the body or None), ...)):
# a decoded frame's ``Table.tensors`` (offsets known), or a compressed frame's records (none).
Entries = tuple[tuple[str, str, tuple[int, ...], tuple[tuple[str, int, int | None], ...]], ...]


def _positions(parts: list[tuple[str, int, int | None]]) -> np.ndarray:
    """Where the elements of ``parts`` (one dtype) lie in the body seen as an array of that
    dtype, end to end (offsets are multiples of ``ALIGN``, so of every part dtype's size)."""
    if not parts:
        return np.zeros(0, np.int64)
    size = PART_DTYPES[parts[0][0]].itemsize
    return np.concatenate([np.arange(o // size, o // size + n, dtype=np.int64) for _, n, o in parts])


@dataclass(frozen=True, eq=False)
class _Layout:
    """Where a frame's values go, from its codec and tensor table alone (``_layout``): which
    part of each tensor starts its values (1 after a top-k tensor's indices), how many values
    each has, the mask that cuts block padding, each tensor's span in the output, and for top-k
    frames the scatter's fixed arrays: the gaps of the dense runs with the slots the index parts
    fill, the slots the indices' checks read, and each value's tensor offset. For a table with
    part offsets, ``reads`` says where in the body each kind of part lies, so ``read`` gathers
    all of a frame's parts in a few whole-body operations."""

    values_from: tuple[int, ...]
    counts: np.ndarray
    keep: np.ndarray | None
    spans: tuple[tuple[int, int], ...]  # each tensor's [start, end) in the output
    sparse: tuple[int, ...] = ()  # the top-k tensors, by position in the frame
    gaps: np.ndarray | None = None
    index_at: np.ndarray | None = None
    firsts: np.ndarray | None = None
    inner: np.ndarray | None = None  # slots of indices after a tensor's first: a gap there must be > 0
    last: np.ndarray | None = None  # each top-k tensor's last value slot ...
    limit: np.ndarray | None = None  # ... whose position must be below its element count
    offsets: np.ndarray | None = None  # each value's tensor's start in the output
    # (dtype, positions) of the first value parts and of the scales; per index dtype, (dtype,
    # positions, slots of ``index_at`` they fill); None for a frame without part offsets
    reads: tuple | None = None
    float32: bool = False  # every tensor's dtype is float32: decoded values are the tensors themselves

    @property
    def numel(self) -> int:
        return self.spans[-1][1] if self.spans else 0

    def read(self, body: bytearray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A body's first value parts, scales and top-k indices, each end to end in frame order."""
        (d1, first), (d2, second), indices = self.reads
        idx = None
        if self.sparse:
            idx = np.empty(len(self.index_at), np.int64)
            for d, at, slots in indices:
                idx[slots] = np.frombuffer(body, d)[at]
        return np.frombuffer(body, d1)[first], np.frombuffer(body, d2)[second], idx


LAYOUTS = 256  # layouts remembered, one per decoded (codec, tensor table)
_layouts: dict[tuple[str, int], tuple[Table, _Layout]] = {}


def _layout(spec: CodecSpec, codec: str, entries: Entries, table: Table | None) -> _Layout:
    """The ``_Layout`` of a frame's ``entries``, remembered per (codec, ``table``): every upload
    for one plan declares the same table (one object, ``core.wire.read_frame``), so the checks
    of its parts against the codec and the arrays that place its values are made once. Raises
    MalformedPayload for parts that do not fit the codec."""
    key = (codec, id(table))
    known = _layouts.get(key) if table is not None else None
    if known is not None and known[0] is table:
        return known[1]
    v = spec.values
    values_from, counts, sparse_at = [], [], []  # sparse_at: (entry, value start, index count)
    index_parts, value_parts = [], []
    start = 0
    for i, (name, _, shape, parts) in enumerate(entries):
        n = math.prod(shape)
        values_from.append(0)
        if sparse(spec, shape):
            if not parts or parts[0][0] not in INDEX_DTYPES:
                raise MalformedPayload(f"tensor {name!r}: topk needs an unsigned index part first")
            sparse_at.append((i, start, parts[0][1]))
            index_parts.append(parts[0])
            n, parts, values_from[-1] = parts[0][1], parts[1:], 1
        expect = _expected_parts(v, n)
        if [(d, c) for d, c, _ in parts] != expect:
            raise MalformedPayload(f"{v} parts {[(d, c) for d, c, _ in parts]}, expected {expect}")
        value_parts.append(parts)
        counts.append(n)
        start += n
    keep = None
    if v.name in QMAX:
        padded = [-(-n // v.block) * v.block for n in counts]
        if padded != counts:
            keep = _segment_positions(padded) < np.repeat(np.asarray(counts, np.int64), padded)
    numels = [math.prod(shape) for _, _, shape, _ in entries]
    ends = list(itertools.accumulate(numels))
    lay = _Layout(tuple(values_from), np.asarray(counts, np.int64), keep,
                  tuple((e - n, e) for n, e in zip(numels, ends)),
                  float32=all(dtype == "float32" for _, dtype, _, _ in entries))
    if sparse_at:
        # Where each value goes: dense tensors' positions are runs (gaps of 1), top-k ones their
        # gaps; one cumulative sum within each tensor's segment gives every position at once.
        firsts = list(itertools.accumulate(counts[:-1], initial=0))
        gaps = np.ones(start, np.int64)
        gaps[np.asarray([f for f, n in zip(firsts, counts) if n], np.int64)] = 0
        ranges = [np.arange(s, s + k, dtype=np.int64) for _, s, k in sparse_at]
        last = [(s + k - 1, numels[i]) for i, s, k in sparse_at if k]
        lay = dataclasses.replace(lay, sparse=tuple(i for i, _, _ in sparse_at), gaps=gaps,
                                  index_at=np.concatenate(ranges), firsts=np.asarray(firsts, np.int64),
                                  inner=np.concatenate([r[1:] for r in ranges]),
                                  last=np.asarray([e for e, _ in last], np.int64),
                                  limit=np.asarray([n for _, n in last], np.int64),
                                  offsets=np.repeat(np.asarray([s for s, _ in lay.spans], np.int64), counts))
    if table is not None:
        firsts_of = [p[0] for p in value_parts if p]
        scales = [p[1] for p in value_parts if len(p) > 1]
        slots = np.cumsum([0] + [n for _, n, _ in index_parts], dtype=np.int64)
        indices = []
        for d in INDEX_DTYPES:
            mine = [j for j, p in enumerate(index_parts) if p[0] == d]
            if mine:
                indices.append((PART_DTYPES[d], _positions([index_parts[j] for j in mine]),
                                np.concatenate([np.arange(slots[j], slots[j + 1]) for j in mine])))
        first_dtype = PART_DTYPES[firsts_of[0][0]] if firsts_of else np.dtype(np.float32)
        lay = dataclasses.replace(lay, reads=((first_dtype, _positions(firsts_of)),
                                              (np.dtype(np.float32), _positions(scales)), tuple(indices)))
        if len(_layouts) >= LAYOUTS:
            _layouts.clear()
        _layouts[key] = (table, lay)
    return lay


def _place(spec: CodecSpec, lay: _Layout, first: np.ndarray, scales: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    """Every tensor's float32 values end to end, from all tensors' first value parts, scales
    and top-k indices (each end to end): one decode of the values (``_decode_values``), one
    scatter of them to their positions (a top-k tensor's delta-coded indices, a dense
    tensor's every position)."""
    x = _decode_values(spec.values, first, scales, lay.keep)
    if not lay.sparse:  # every tensor dense: the values are the tensors, end to end
        return x
    gaps = lay.gaps.copy()
    gaps[lay.index_at] = idx
    total = np.cumsum(gaps)
    local = total - np.repeat(np.concatenate([[0], total])[lay.firsts], lay.counts)
    if (gaps[lay.inner] == 0).any() or (local[lay.last] >= lay.limit).any():
        raise MalformedPayload("topk indices repeat or run past their tensor's elements")
    out = np.zeros(lay.numel, np.float32)
    out[local + lay.offsets] = x
    return out


def reconstruct_flat(frame: Frame) -> np.ndarray:
    """Every tensor of a frame decoded as float32, end to end in frame order, in one pass
    (``_place``), with what depends only on the frame's table made once per table
    (``_layout``). A phone's update is 14 small tensors: a dozen numpy and torch calls on tiny
    arrays per tensor had cost more than the arithmetic. Raises MalformedPayload for parts that
    do not fit the codec."""
    spec = _spec(frame.codec)
    entries = frame.table.tensors if frame.table is not None else tuple(
        (r.name, r.dtype, r.shape, tuple((d, p.size, None) for d, p in zip(r.part_dtypes, r.parts)))
        for r in frame.tensors)
    lay = _layout(spec, frame.codec, entries, frame.table)
    values = [r.parts[j:] for r, j in zip(frame.tensors, lay.values_from)]
    first = np.concatenate([p[0] for p in values]) if values else np.zeros(0, np.float32)
    scales = np.concatenate([p[1] for p in values]) if values and spec.values.name in QMAX else np.zeros(0, np.float32)
    idx = np.concatenate([frame.tensors[i].parts[0] for i in lay.sparse]) if lay.sparse else None
    return _place(spec, lay, first, scales, idx)


def reconstruct(frame: Frame) -> dict[str, torch.Tensor]:
    """The float32 tensors a frame decodes to (shaped, before casting to their own dtype):
    views into one buffer (``reconstruct_flat``)."""
    flat = torch.from_numpy(reconstruct_flat(frame))
    pieces = flat.split([r.numel for r in frame.tensors]) if frame.tensors else ()
    return {r.name: p.view(r.shape) for r, p in zip(frame.tensors, pieces)}


def encode(tensors: dict[str, torch.Tensor], spec: str | CodecSpec, kind: str = "update",
           meta: dict | None = None) -> bytes:
    """Tensors to a self-describing payload (format version, codec chain, names, shapes, dtypes)."""
    spec = _as_spec(spec)
    return encode_frame(compress(tensors, spec, kind, meta), spec.zstd)


def decode(data: bytes, limits: Limits = Limits()) -> Payload:
    """Bounded decode: every limit in ``limits`` is checked; tensors come back in their own dtype.

    The frame's parts are read straight from its body by the gathers its table's layout holds
    (``_Layout.read``): no array per part, no record per tensor. Each tensor's sum of squares
    (one BLAS dot) says whether its values are finite (a NaN or inf anywhere makes it so; only
    then, or for a norm bound, the slower pass that tells NaN from a huge value) and comes back
    in ``Payload.squares`` for its float32 tensors, so the aggregator's norm reads no value again.
    When every tensor is float32 the tensors are views of one buffer, ``Payload.flat``."""
    head, table, body = read_frame(data, limits)
    spec = _spec(head["codec"])
    lay = _layout(spec, head["codec"], table.tensors, table)
    flat = _place(spec, lay, *lay.read(body))
    arrays = [flat[a:b] for a, b in lay.spans]  # views of the one buffer, in frame order
    with np.errstate(over="ignore"):
        squares = list(map(float, map(np.dot, arrays, arrays)))
    if (limits.finite and not all(map(math.isfinite, squares))) or limits.max_norm is not None:
        check_values({name: a for (name, *_), a in zip(table.tensors, arrays)}, limits)
    if lay.float32:  # every tensor is already itself: a view of the buffer, shaped
        tensors = {name: torch.from_numpy(a.reshape(shape)) for (name, _, shape, _), a in zip(table.tensors, arrays)}
        return Payload(head["kind"], head["codec"], head["meta"], tensors,
                       dict(zip(tensors, squares)), flat)
    tensors = {name: torch.from_numpy(a.reshape(shape)) if dtype == "float32" else from_numpy(a, dtype, shape)
               for (name, dtype, shape, _), a in zip(table.tensors, arrays)}
    return Payload(head["kind"], head["codec"], head["meta"], tensors,
                   {name: q for (name, dtype, *_), q in zip(table.tensors, squares) if dtype == "float32"})


def nbytes_fp32(tensors: dict[str, torch.Tensor]) -> int:
    """What the tensors weigh as raw float32: the baseline every compression ratio divides."""
    return 4 * sum(math.prod(t.shape) for t in tensors.values())
