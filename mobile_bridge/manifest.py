"""The bundle format: what a native app downloads to train a plan with its own runtime.

A bundle is a folder: the runtime's program files plus ``manifest.json``, which says which
model and plan the program is for (spec and plan hashes), which runtime and exporter built
it, the input shapes, where every weight sits in the runtime's own storage (names, shapes,
dtypes, byte offsets, in the runtime's order) and the sha256 of every file. A reader checks
all of it before a runtime touches the files, so a corrupt or mismatched download is refused
with a reason instead of training garbage. Needs only the standard library and
``stamen.export.common`` (no model code): the reference device imports it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stamen.core.errors import UserError
from stamen.export.common import ParamSlot

MANIFEST = "manifest.json"
FORMAT = 1


class BundleError(UserError):
    """A bundle that must not be used: corrupt, incomplete, or for another model/plan/runtime."""


@dataclass(frozen=True)
class Manifest:
    spec_name: str
    spec_hash: str
    plan: dict[str, Any]  # Plan.to_dict(): a record, so a device needs no plan code to read it
    plan_hash: str
    runtime: str
    exporter: dict[str, str]  # tool versions that built the program; ExecuTorch: "backend"
    inputs: tuple[dict, ...]
    layout_of: str  # what the params' offsets index: a file of the bundle, or "contiguous"
    params: tuple[ParamSlot, ...]
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}

    def trainable(self) -> list[ParamSlot]:
        return [s for s in self.params if s.trainable]

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            d = json.loads(text)
            fmt = d.pop("format", None)
            if fmt != FORMAT:
                raise BundleError(f"bundle format {fmt} is not {FORMAT}: update stamen")
            d["inputs"] = tuple(d["inputs"])
            d["params"] = tuple(ParamSlot(**{**p, "shape": tuple(p["shape"])}) for p in d["params"])
            return cls(**d)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BundleError(f"{MANIFEST} is not a valid manifest: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(manifest.to_json())
    return path


def read_bundle(folder: str | Path, spec_hash: str | None = None, plan_hash: str | None = None,
                runtime: str | None = None) -> Manifest:
    """The verified manifest of a bundle folder. Raises BundleError naming the first problem:
    a missing manifest or file, a size or checksum mismatch, or a bundle built for another
    model, plan or runtime than the caller expects."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {folder}: no {MANIFEST}")
    m = Manifest.from_json(path.read_text())
    for what, want, have in (("model", spec_hash, m.spec_hash), ("plan", plan_hash, m.plan_hash),
                             ("runtime", runtime, m.runtime)):
        if want is not None and want != have:
            raise BundleError(f"bundle {folder} is for {what} {have}, not {want}")
    for name, entry in m.files.items():
        f = folder / name
        if Path(name).name != name:
            raise BundleError(f"bundle {folder}: file name {name!r} leaves the bundle folder")
        if not f.is_file():
            raise BundleError(f"bundle {folder}: file {name} is missing")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise BundleError(f"bundle {folder}: file {name} fails its checksum (corrupt or altered)")
    return m
