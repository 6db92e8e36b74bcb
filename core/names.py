"""What a user names on the command line (a model, a data source), checked without torch or
the data itself, so that a mistake is answered in a fraction of a second instead of after
seconds (minutes on a busy machine) of imports. ``ModelSpec`` and ``load_corpus`` apply these
same checks, so the CLI's early answer and the library's cannot disagree."""

from __future__ import annotations

from pathlib import Path

from stamen.core.errors import UserError
from stamen.core.presets import PRESETS


def check_model_name(name: str) -> None:
    """Refuse a name that is neither a preset, a factory ``pkg.module:function`` nor ``hf:PATH``
    (whose folder ``ModelSpec`` checks)."""
    if not name.startswith("hf:") and name not in PRESETS and ":" not in name:
        raise UserError(f"unknown model {name!r}: use one of {', '.join(PRESETS)}, 'pkg.module:function' or 'hf:PATH'")


def check_source(source: str) -> None:
    """Refuse a data source that is neither ``stdlib`` nor an existing file or folder."""
    if source != "stdlib" and not Path(source).exists():
        raise UserError(f"data source not found: {source}")
