"""The codec spec syntax, e.g. ``int8(block=256)+zstd(3)`` or ``topk(0.02)+int4+zstd(1)``.

A chain is an optional ``topk`` (which keeps the largest-magnitude fraction of each matrix, or
of each ``chunk`` of it, and hands the kept values on), then one value codec (``fp32``, ``fp16``, ``bf16``, ``int8``,
``int4``; ``fp32`` if none is named), then an optional ``zstd`` over the whole body. That
fixed order is the only one that means anything, so anything else is a ``UserError``.
``str(spec)`` is the canonical chain every payload records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stamen.core.errors import UserError

VALUE_CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
SELECTIONS = ("exact", "sample")
_STAGE = re.compile(r"^([a-z0-9]+)(?:\((.*)\))?$")


@dataclass(frozen=True)
class TopK:
    fraction: float
    select: str = "exact"  # "exact" (argpartition) or "sample" (threshold from a seeded sample)
    seed: int = 0
    # Elements per chunk: keep the top fraction of every run of ``chunk`` elements rather than of
    # the whole tensor (SparseLoCo, DeMo), so every region of a tensor sends its share and index
    # gaps stay below 2 * chunk. Always exact; None selects over the whole tensor.
    chunk: int | None = None

    def __str__(self) -> str:
        extra = "" if self.select == "exact" else f", select=sample, seed={self.seed}"
        extra += "" if self.chunk is None else f", chunk={self.chunk}"
        return f"topk({self.fraction:g}{extra})"


@dataclass(frozen=True)
class Values:
    name: str  # one of VALUE_CODECS
    block: int = 256  # int8/int4: elements per absmax scale

    def __str__(self) -> str:
        return f"{self.name}(block={self.block})" if self.name in ("int8", "int4") else self.name


@dataclass(frozen=True)
class CodecSpec:
    values: Values = Values("fp32")
    topk: TopK | None = None
    zstd: int | None = None  # zstd level, None for a raw body

    def __str__(self) -> str:
        stages = ([str(self.topk)] if self.topk else []) + [str(self.values)]
        return "+".join(stages + ([f"zstd({self.zstd})"] if self.zstd is not None else []))

    @property
    def lossless(self) -> bool:
        """Exact for float32 inputs (the narrower float codecs are exact for their own dtype)."""
        return self.topk is None and self.values.name == "fp32"


def _args(stage: str, text: str | None) -> tuple[list[str], dict[str, str]]:
    if text is None:
        return [], {}
    pos, kw = [], {}
    for item in (a.strip() for a in text.split(",")):
        if not item:
            raise UserError(f"codec stage {stage!r} has an empty argument")
        key, eq, value = item.partition("=")
        if eq:
            kw[key.strip()] = value.strip()
        elif kw:
            raise UserError(f"codec stage {stage!r}: positional argument after a keyword")
        else:
            pos.append(item)
    return pos, kw


def _number(stage: str, key: str, value: str, kind: type, low: float, high: float):
    try:
        x = kind(value)
    except ValueError:
        raise UserError(f"codec stage {stage!r}: {key}={value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if not low <= x <= high:
        raise UserError(f"codec stage {stage!r}: {key}={value} is outside [{low:g}, {high:g}]")
    return x


def _bind(stage: str, name: str, pos: list[str], kw: dict[str, str], allowed: tuple[str, ...]) -> dict[str, str]:
    """Positional then keyword arguments onto ``allowed`` parameter names, each at most once."""
    if len(pos) > len(allowed):
        raise UserError(f"codec stage {stage!r}: {name} takes at most {len(allowed)} argument(s)")
    bound = dict(zip(allowed, pos))
    for k, v in kw.items():
        if k not in allowed:
            raise UserError(f"codec stage {stage!r}: unknown argument {k!r} (allowed: {', '.join(allowed) or 'none'})")
        if k in bound:
            raise UserError(f"codec stage {stage!r}: argument {k!r} given twice")
        bound[k] = v
    return bound


def parse(spec: str) -> CodecSpec:
    """Parse a chain like ``topk(0.02)+int4+zstd(1)``; a bad spec raises a one-line UserError."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("empty codec spec: use e.g. 'int8(block=256)+zstd(3)'")
    topk, values, level = None, None, None
    for i, stage in enumerate(s.strip() for s in spec.split("+")):
        m = _STAGE.match(stage)
        if not m:
            raise UserError(f"cannot parse codec stage {stage!r} in {spec!r}: write name or name(args)")
        name, (pos, kw) = m.group(1), _args(stage, m.group(2))
        if name == "topk":
            if i != 0:
                raise UserError(f"in {spec!r}: topk must be the first stage")
            a = _bind(stage, name, pos, kw, ("fraction", "select", "seed", "chunk"))
            if "fraction" not in a:
                raise UserError(f"codec stage {stage!r}: topk needs a fraction, e.g. topk(0.02)")
            select = a.get("select", "exact")
            if select not in SELECTIONS:
                raise UserError(f"codec stage {stage!r}: select must be one of {', '.join(SELECTIONS)}")
            chunk = _number(stage, "chunk", a["chunk"], int, 1, 1 << 30) if "chunk" in a else None
            if chunk is not None and select != "exact":
                raise UserError(f"codec stage {stage!r}: chunked topk is always exact; drop select")
            topk = TopK(_number(stage, "fraction", a["fraction"], float, 1e-6, 1.0), select,
                        _number(stage, "seed", a.get("seed", "0"), int, 0, 2**63 - 1), chunk)
        elif name in VALUE_CODECS:
            if values is not None or level is not None:
                raise UserError(f"in {spec!r}: one value codec ({', '.join(VALUE_CODECS)}), after topk and before zstd")
            a = _bind(stage, name, pos, kw, ("block",) if name in ("int8", "int4") else ())
            values = Values(name, _number(stage, "block", a.get("block", "256"), int, 2, 1 << 20))
            if name == "int4" and values.block % 2:
                raise UserError(f"codec stage {stage!r}: int4 packs pairs, so block must be even")
        elif name == "zstd":
            if level is not None:
                raise UserError(f"in {spec!r}: zstd appears twice")
            a = _bind(stage, name, pos, kw, ("level",))
            level = _number(stage, "level", a.get("level", "3"), int, 1, 22)
        else:
            raise UserError(f"unknown codec stage {name!r} in {spec!r}: use topk, {', '.join(VALUE_CODECS)}, zstd")
    return CodecSpec(values or Values("fp32"), topk, level)
