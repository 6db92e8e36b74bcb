"""One way to read settings: each component owns a frozen dataclass of its settings (a
docstring per field, its own checks in ``__post_init__``, defaults equal to the packaged TOML's,
which a test holds them to), and ``from_table`` maps a TOML table onto it with one-line errors
that name the file's section and key. torchtitan's per-component configs are the model.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from stamen.core.errors import UserError

T = TypeVar("T")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _convert(where: str, value: Any, kind: Any) -> Any:
    """``value`` as the annotated ``kind`` (an int is fine where a float is expected, as TOML
    users write ``lr = 1``), or a one-line error."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _convert(where, value, kind)
    ok = {int: _is_int, float: lambda v: _is_int(v) or isinstance(v, float), str: lambda v: isinstance(v, str),
          bool: lambda v: isinstance(v, bool)}
    if kind in ok:
        if not ok[kind](value):
            raise UserError(f"{where}: {value!r} has the wrong type (expected {kind.__name__})")
        return kind(value)
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise UserError(f"{where}: {value!r} should be a list of {len(args) if args[-1] is not Ellipsis else 'any'} items")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(_convert(where, v, k) for v, k in zip(value, items))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table")
        return {k: _convert(f"{where} {k}", v, args[1]) for k, v in value.items()}
    raise TypeError(f"{where}: no conversion for {kind!r}")


def from_table(cls: type[T], table: Any, where: str, skip: tuple[str, ...] = ()) -> T:
    """An instance of dataclass ``cls`` from a TOML table: keys it omits keep their defaults;
    an unknown key, a value of the wrong type, or a value the class's own checks refuse stops
    with one line naming ``where`` and the key. ``skip``: fields the caller fills itself."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in table:
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name not in table
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    values = {k: _convert(f"{where} {k}", v, hints[k]) for k, v in table.items()}
    try:
        return cls(**values)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def defaults(cls: type) -> dict[str, Any]:
    """Field → default of dataclass ``cls`` (fields without one are left out), for the test that
    holds the packaged TOML files to the dataclasses."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A settings file as a dict, or one line: not found, or where its TOML breaks."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path}: {e}") from None
