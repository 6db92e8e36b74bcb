"""Wire framing shared by the server, the clients and the simulator: one msgpack envelope that
describes a set of named tensors and carries their encoded parts in one (optionally
zstd-compressed) body.

A frame is what a stranger sends us, so decoding is bounded before anything is allocated:
the frame's size, msgpack's lengths and nesting, the number of tensors and elements, the
declared body size, dtypes and shapes are all checked against ``Limits`` first; the body is
then decompressed with a streaming reader into a buffer of exactly the declared size, so a
zstd bomb is caught after at most one extra byte. Each violated limit raises its own
``WireError`` subclass whose message names the limit, so the HTTP server can answer 4xx with it.

A frame is a msgpack header map (all keys always present) followed by the body::

    {"format": 1, "kind": str, "codec": str, "meta": {str: scalar},
     "tensors": [[name, dtype, shape, [[part_dtype, count], ...]], ...],
     "zstd": bool, "body_bytes": int}  ‖  body

The body sits after the header rather than inside it as a msgpack bin so that neither side
copies it an extra time. Uncompressed, it is every part's bytes in order, each padded to a
multiple of ``ALIGN`` bytes so the decoder can view parts as typed arrays in place. What the parts mean is the codec's business
(``stamen.compression``); this module only frames them.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zstandard

from stamen.core.errors import UserError

FORMAT_VERSION = 1
ALIGN = 8
# Dtypes a part may have; bfloat16 travels as its raw 16 bits (numpy has no bfloat16).
PART_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8), "int8": np.dtype(np.int8), "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32), "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16),
}
HEADER_KEYS = {"format", "kind", "codec", "meta", "tensors", "zstd", "body_bytes"}
# Protocol names every role shares (server, edge client, reference device, CLI), here because
# this module is the protocol's lowest layer and imports no torch (the CLI stays quick to start).
RUNTIMES = ("torch", "ort", "executorch")  # what a task may name: eager torch, or an exported bundle
BUNDLE_RUNTIMES = ("ort", "executorch")  # the runtimes that train an exported bundle
LONG_POLL_S = 30  # the longest GET /v1/task wait a client asks for (the server caps it at [server] long_poll_s)
# The federation's one weights codec: float32 values, zstd level 1, lossless. Weights go down in
# it (``compression.downlink``) because clients compute Δ against them; it is named here, in
# the frame's own module, so a runtime-only device that reads frames without the codecs
# (``mobile_bridge.device``) names the same one.
WEIGHTS_CODEC = "fp32+zstd(1)"


class WireError(UserError):
    """A frame broke a rule; the message names the rule. The server answers 4xx with it."""


class FrameTooLarge(WireError):
    """The frame is larger than ``max_compressed_bytes``."""


class DecompressedTooLarge(WireError):
    """The body declares or inflates to more than ``max_decompressed_bytes`` (zstd bomb)."""


class TooManyTensors(WireError):
    """More tensors than ``max_tensors``."""


class TooManyElements(WireError):
    """More tensor elements in all than ``max_elements``."""


class TooDeep(WireError):
    """msgpack nesting deeper than ``max_depth`` (nesting bomb)."""


class LengthLimit(WireError):
    """A msgpack string, array or map longer than ``max_len``."""


class TruncatedFrame(WireError):
    """The frame or its body ends early."""


class MalformedFrame(WireError):
    """Not a frame: bad msgpack, missing or mistyped fields, trailing bytes, corrupt zstd."""


class UnsupportedVersion(WireError):
    """The frame's format version is not the one this code speaks."""


class BadDtype(WireError):
    """A tensor or part dtype outside the whitelist."""


class NameMismatch(WireError):
    """The tensor names differ from the expected manifest's."""


class ShapeMismatch(WireError):
    """A tensor's shape differs from the expected manifest's."""


class NonFinite(WireError):
    """A decoded tensor holds NaN or infinity."""


class NormTooLarge(WireError):
    """The decoded tensors' global L2 norm exceeds ``max_norm``."""


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. Defaults fit a gpt-1.3b fp32 update; a server narrows them
    per task (``manifest`` = the plan's trainable slice shapes, ``max_norm`` from its policy)."""

    max_compressed_bytes: int = 8 << 30
    max_decompressed_bytes: int = 8 << 30
    max_tensors: int = 4096
    max_elements: int = 2 << 30
    max_depth: int = 6
    max_len: int = 1 << 16
    dtypes: frozenset[str] = frozenset({"float32", "float16", "bfloat16"})
    manifest: dict[str, tuple[int, ...]] | None = field(default=None, hash=False)
    finite: bool = True
    max_norm: float | None = None


@dataclass
class TensorRecord:
    """One tensor in a frame: its identity and its encoded parts (numpy arrays)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[np.ndarray]
    part_dtypes: list[str]

    @property
    def numel(self) -> int:
        # Not a cached_property: that takes a lock on its first read (Python 3.11), which cost
        # more than this product of a few ints, on every record of every frame decoded.
        return math.prod(self.shape)


@dataclass
class Frame:
    kind: str  # "update", "weights", "delta"
    codec: str  # canonical codec chain, e.g. "int8(block=256)+zstd(3)"
    meta: dict
    tensors: list[TensorRecord]
    # A decoded frame's checked tensor table (names, dtypes, shapes, part sizes), one object
    # for every frame that declares the same table (``decode_frame``), so what depends on the
    # table alone is worked out once per table (``compression.codecs.reconstruct_flat``).
    table: Table | None = None


@dataclass(frozen=True, eq=False)
class Table:
    """A frame's tensor table, checked against a ``Limits``: per tensor (name, dtype, shape,
    ((part dtype, count, byte offset in the body), ...)), and the body's size in bytes."""

    tensors: tuple[tuple[str, str, tuple[int, ...], tuple[tuple[str, int, int], ...]], ...]
    size: int


TABLES = 256  # tables remembered (every upload for one plan and codec declares the same one)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def encode_frame(frame: Frame, zstd_level: int | None) -> bytes:
    """Frame ``frame``'s parts; ``zstd_level`` None sends the body raw."""
    header, chunks = [], []
    for t in frame.tensors:
        header.append([t.name, t.dtype, list(t.shape),
                       [[d, int(p.size)] for d, p in zip(t.part_dtypes, t.parts)]])
        for p in t.parts:
            chunks.append(memoryview(np.ascontiguousarray(p)).cast("B"))
            pad = _padded(p.nbytes) - p.nbytes
            if pad:
                chunks.append(bytes(pad))
    if zstd_level is not None:
        compressor = zstandard.ZstdCompressor(level=zstd_level).compressobj()
        chunks = [compressor.compress(c) for c in chunks] + [compressor.flush()]
    head = packb({"format": FORMAT_VERSION, "kind": frame.kind, "codec": frame.codec,
                  "meta": frame.meta, "tensors": header, "zstd": zstd_level is not None,
                  "body_bytes": sum(len(c) for c in chunks)})
    return b"".join([head, *chunks])


def _check_depth(obj, max_depth: int) -> None:
    """No value deeper than ``max_depth`` (the root is at 0). Level by level over the containers
    only: the object is already length-bounded, so this is cheap and cannot recurse, and the
    scalars (most of a header: names, shapes, sizes) are never visited one by one."""
    level, depth = [obj] if isinstance(obj, (dict, list)) else [], 0
    while level:
        below = []
        for o in level:
            children = o.values() if isinstance(o, dict) else o
            if children and depth + 1 > max_depth:
                raise TooDeep(f"msgpack nesting deeper than max_depth={max_depth}")
            below.extend(c for c in children if isinstance(c, (dict, list)))
        level, depth = below, depth + 1


def _unpacker(data: bytes, limits: Limits) -> msgpack.Unpacker:
    """A msgpack reader over ``data`` with the frame's length limits."""
    return msgpack.Unpacker(io.BytesIO(data), raw=False, strict_map_key=True,
                            max_buffer_size=len(data) or 1, max_str_len=limits.max_len,
                            max_array_len=limits.max_len, max_map_len=limits.max_len,
                            max_bin_len=limits.max_len, max_ext_len=0)


def _unpack(data: bytes, limits: Limits) -> tuple[dict, memoryview]:
    """The header, checked, and the body bytes after it."""
    if len(data) > limits.max_compressed_bytes:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds max_compressed_bytes={limits.max_compressed_bytes}")
    unpacker = _unpacker(data, limits)
    try:
        head = unpacker.unpack()
    except msgpack.StackError:
        raise TooDeep(f"msgpack nesting deeper than max_depth={limits.max_depth}") from None
    except msgpack.OutOfData:
        raise TruncatedFrame("frame ends inside its header") from None
    except ValueError as e:
        if "exceeds max_" in str(e):
            raise LengthLimit(f"msgpack length over max_len={limits.max_len}: {e}") from None
        raise MalformedFrame(f"header is not msgpack: {e}") from None
    except Exception as e:  # msgpack raises assorted types for garbage input
        raise MalformedFrame(f"header is not msgpack: {e}") from None
    if not isinstance(head, dict) or set(head) != HEADER_KEYS:
        _check_depth(head, limits.max_depth)
        raise MalformedFrame(f"header must hold exactly the keys {sorted(HEADER_KEYS)}")
    return head, _checked(head, data, unpacker.tell(), limits)


def _checked(head: dict, data: bytes, end: int, limits: Limits) -> memoryview:
    """The checks of a header holding exactly ``HEADER_KEYS``, whose bytes end at ``end``; the
    body bytes after it."""
    # The tensor entries are checked one scalar at a time at their fixed depth by
    # ``_parse_header``, which walks their depth only when one is malformed: walking their ~80
    # small lists on every update was a tenth of its decode.
    _check_depth({k: v for k, v in head.items() if k != "tensors"}, limits.max_depth)
    if head["format"] != FORMAT_VERSION:
        raise UnsupportedVersion(f"format version {head['format']!r}, this code speaks {FORMAT_VERSION}")
    if not (isinstance(head["kind"], str) and isinstance(head["codec"], str)
            and isinstance(head["meta"], dict) and isinstance(head["tensors"], list)
            and isinstance(head["zstd"], bool) and isinstance(head["body_bytes"], int)):
        raise MalformedFrame("header field of the wrong type")
    body = memoryview(data)[end:]
    if len(body) < head["body_bytes"]:
        raise TruncatedFrame(f"body holds {len(body)} bytes, the header declares {head['body_bytes']}")
    if len(body) > head["body_bytes"]:
        raise MalformedFrame(f"{len(body) - head['body_bytes']} trailing bytes after the body")
    return body


def _known_table(data: bytes, limits: Limits) -> tuple[dict, Table, int] | bytes | None:
    """The header read without its tensor entries, when their bytes are a table checked before
    (``_tables``): (the header, its ``tensors`` the entries as a list, the table, where the
    header ends). Every upload of a plan declares the same entries, and unpacking their ~100
    small objects and re-packing them to find the table (``_table``) cost more than the rest of
    the header. Anything else, including any error, is left to ``_unpack`` (the one place a bad
    header gets its error), and the answer is the entries' bytes when found, else None."""
    if len(data) > limits.max_compressed_bytes:
        return None
    unpacker, entries = _unpacker(data, limits), None
    try:
        if unpacker.read_map_header() != len(HEADER_KEYS):
            return None
        head = {}
        for _ in HEADER_KEYS:
            key = unpacker.unpack()
            if key == "tensors" and entries is None:
                start = unpacker.tell()
                unpacker.skip()
                entries = bytes(data[start:unpacker.tell()])
                head[key] = None
            else:
                head[key] = unpacker.unpack()
    except Exception:  # whatever it is, ``_unpack`` says it
        return None
    if set(head) != HEADER_KEYS or entries is None:
        return None
    known = _tables.get((entries, limits))
    if known is None:
        return entries
    head["tensors"] = known[1]
    return head, known[0], unpacker.tell()


def _parse_header(entries: list, limits: Limits) -> list[tuple[str, str, tuple[int, ...], list[tuple[str, int]]]]:
    if len(entries) > limits.max_tensors:
        raise TooManyTensors(f"{len(entries)} tensors exceed max_tensors={limits.max_tensors}")
    out, names, elements = [], set(), 0
    for e in entries:
        try:
            name, dtype, shape, parts = e
            ok = (isinstance(name, str) and isinstance(dtype, str)
                  and all(isinstance(s, int) and s >= 0 for s in shape)
                  and all(isinstance(d, str) and isinstance(n, int) and n >= 0 for d, n in parts))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            _check_depth({"tensors": entries}, limits.max_depth)  # at its depth in the header: a nesting bomb is TooDeep
            raise MalformedFrame(f"bad tensor entry {str(e)[:80]}")
        if name in names:
            raise MalformedFrame(f"tensor {name!r} appears twice")
        names.add(name)
        if dtype not in limits.dtypes:
            raise BadDtype(f"tensor {name!r} has dtype {dtype!r}, allowed: {sorted(limits.dtypes)}")
        bad = [d for d, _ in parts if d not in PART_DTYPES]
        if bad:
            raise BadDtype(f"tensor {name!r} has part dtype {bad[0]!r}, allowed: {sorted(PART_DTYPES)}")
        elements += math.prod(shape)
        if elements > limits.max_elements:
            raise TooManyElements(f"more than max_elements={limits.max_elements} tensor elements")
        out.append((name, dtype, tuple(shape), [(d, n) for d, n in parts]))
    if limits.manifest is not None:
        if names != set(limits.manifest):
            missing, extra = sorted(set(limits.manifest) - names), sorted(names - set(limits.manifest))
            raise NameMismatch(f"tensors differ from the manifest: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, _, shape, _ in out:
            if shape != tuple(limits.manifest[name]):
                raise ShapeMismatch(f"tensor {name!r} has shape {list(shape)}, the manifest says {list(limits.manifest[name])}")
    return out


# a checked table by the bytes of its entries as a frame sent them, with the entries as parsed
# from those bytes (``_table``, ``_known_table``)
_tables: dict[tuple[bytes, Limits], tuple[Table, list]] = {}
_zstd = threading.local()  # a decompressor per thread (one costs more to make than a phone's body to inflate)
_packers = threading.local()


def packb(obj) -> bytes:
    """``msgpack.packb(obj)``, the same bytes, through one ``msgpack.Packer`` per thread.
    ``msgpack.packb`` makes a Packer per call, and with it a 256 KiB buffer that it allocates
    and frees; in a busy server glibc consolidates its fast bins on each free that large, and
    packing a small answer cost several times the packing itself (~4% of the event loop at 1,000
    clients, an upload's answer and its frame's table key). A failed pack resets the buffer."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer()
    return packer.pack(obj)


def _table(entries: list, raw: bytes, limits: Limits) -> Table:
    """``_parse_header``'s verdict on a tensor table, remembered by ``raw``, the entries' msgpack
    bytes (equal bytes are an equal table, so an equal verdict): a phone's uploads all declare
    the same 14 entries, and checking them again for each was a sixth of its frame's decode. A
    table that breaks a limit raises every time and is never remembered."""
    key = (raw, limits)
    known = _tables.get(key)
    if known is None:
        spans, size = [], 0
        for name, dtype, shape, parts in _parse_header(entries, limits):
            placed = []
            for d, n in parts:
                placed.append((d, n, size))
                size += _padded(n * PART_DTYPES[d].itemsize)
            spans.append((name, dtype, shape, tuple(placed)))
        known = Table(tuple(spans), size), entries
        if len(_tables) >= TABLES:  # bounded whatever a sender declares: start over
            _tables.clear()
        _tables[key] = known
    return known[0]


def _read_body(head: dict, body: memoryview, size: int, limits: Limits) -> bytearray:
    """The parts' bytes, exactly ``size`` of them, writable (so parts become tensors without a
    copy); zstd output is read into that buffer and never past it plus one byte."""
    if size > limits.max_decompressed_bytes:
        raise DecompressedTooLarge(f"body declares {size} bytes, over max_decompressed_bytes={limits.max_decompressed_bytes}")
    if not head["zstd"]:
        if len(body) != size:
            raise TruncatedFrame(f"body holds {len(body)} bytes, its parts need {size}")
        return bytearray(body)
    out = bytearray(size)
    if not hasattr(_zstd, "d"):
        _zstd.d = zstandard.ZstdDecompressor()
    try:
        with _zstd.d.stream_reader(body, read_across_frames=True) as reader:
            got, view = 0, memoryview(out)
            while got < size:
                n = reader.readinto(view[got:])
                if n == 0:
                    raise TruncatedFrame(f"body inflates to {got} bytes, its parts need {size}")
                got += n
            if reader.read(1):
                raise DecompressedTooLarge(f"body inflates past its declared {size} bytes (zstd bomb)")
    except zstandard.ZstdError as e:
        raise MalformedFrame(f"corrupt zstd body: {e}") from None
    return out


def read_frame(data: bytes, limits: Limits = Limits()) -> tuple[dict, Table, bytearray]:
    """Parse and check a frame: its header, its checked tensor table (one object per distinct
    table, ``_table``) and its body's bytes, inflated, where the table's part offsets point.
    A decoder that knows the table (``compression.codecs.decode``) reads the parts from the
    body in a few whole-body operations instead of one array per part. A header whose entries'
    bytes passed as a table before is read without unpacking them (``_known_table``)."""
    known = _known_table(data, limits)
    if isinstance(known, tuple):
        head, table, end = known
        return head, table, _read_body(head, _checked(head, data, end, limits), table.size, limits)
    head, raw = _unpack(data, limits)
    table = _table(head["tensors"], known if known is not None else packb(head["tensors"]), limits)
    return head, table, _read_body(head, raw, table.size, limits)


def decode_frame(data: bytes, limits: Limits = Limits()) -> Frame:
    """Parse and check a frame; parts come back as numpy views into one body buffer."""
    head, table, body = read_frame(data, limits)
    tensors = [TensorRecord(name, dtype, shape, [np.frombuffer(body, PART_DTYPES[d], n, offset) for d, n, offset in parts],
                            [d for d, _, _ in parts])
               for name, dtype, shape, parts in table.tensors]
    return Frame(head["kind"], head["codec"], head["meta"], tensors, table)


def check_values(arrays: dict[str, np.ndarray], limits: Limits) -> None:
    """Finite check and norm bound over decoded float32 arrays. One BLAS dot per tensor is
    the fast path; the slower element scan runs only to tell NaN/inf from a huge norm. A float32
    dot of finite but huge values overflows to inf, which is that huge norm: no warning for it."""
    total = 0.0
    for name, a in arrays.items():
        with np.errstate(over="ignore"):
            sq = float(np.dot(a, a)) if a.size else 0.0
        if not math.isfinite(sq) and limits.finite and not np.isfinite(a).all():
            raise NonFinite(f"tensor {name!r} holds NaN or infinity")
        total += sq
    if limits.max_norm is not None and not math.sqrt(total) <= limits.max_norm:
        raise NormTooLarge(f"update L2 norm {math.sqrt(total):.4g} exceeds max_norm={limits.max_norm}")
