"""Export a plan for a runtime into a bundle folder (program + weights files + manifest),
through a cache: programs depend only on (model spec, plan, runtime, input shape, exporter
versions), never on a version's weights, so each is exported once and reused."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from stamen.core.errors import UserError
from stamen.core.model import ModelSpec
from stamen.core.lora import LoraPlan
from stamen.core.plan import Plan
from stamen.core.wire import BUNDLE_RUNTIMES
from stamen.mobile_bridge.manifest import Manifest, file_entries, read_bundle, write_manifest

DEFAULT_CACHE = Path(os.environ.get("STAMEN_CACHE", Path.home() / ".cache" / "stamen")) / "exports"


def exporter_versions(runtime: str) -> dict[str, str]:
    tool = "onnxruntime-training" if runtime == "ort" else "executorch"
    return {"torch": torch.__version__, tool: version(tool)}


def bundle_key(spec: ModelSpec, plan: Plan, runtime: str, batch_size: int, seq_len: int) -> str:
    """The cache folder name. ORT programs have dynamic shapes, so the shape is not part of
    their key; ExecuTorch programs are traced for one batch x seq."""
    shape = "dyn" if runtime == "ort" else f"{batch_size}x{seq_len}"
    tools = "-".join(f"{k}{v}" for k, v in sorted(exporter_versions(runtime).items()))
    return f"{spec.hash}-{plan.hash}-{runtime}-{shape}-{tools}".replace("+", "_")


def export_bundle(spec: ModelSpec, plan: Plan, runtime: str, out_dir: str | Path, batch_size: int = 8,
                  seq_len: int = 64, cache_dir: str | Path | None = None, xnnpack: bool = True) -> Path:
    """Write the bundle of ``plan`` for ``runtime`` into ``out_dir`` (created; existing bundle
    files replaced) and return it. Backs ``stamen export``. The exported program comes from
    the cache when it holds a verified copy. ``xnnpack`` (ExecuTorch only) delegates the
    matrix products to XNNPACK: 4-6x faster than the portable kernels (bench/runtimes.py)."""
    if runtime not in BUNDLE_RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}: use one of {', '.join(BUNDLE_RUNTIMES)}")
    cfg = spec.gpt_config()
    if cfg is None:
        raise UserError(f"model {spec.name!r} is not a stamen GPT: only GPT plans can be exported")
    cached = cached_bundle(spec, plan, runtime, batch_size, seq_len, cache_dir, xnnpack)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def publish_bundle(spec: ModelSpec, plan: Plan, runtime: str, bundles_dir: str | Path, batch_size: int,
                   seq_len: int, cache_dir: str | Path | None = None) -> Path:
    """Export into the server's layout, ``<bundles_dir>/<plan hash>/<runtime>/``, which
    ``GET /v1/bundles/{plan}/{runtime}`` serves (bundles_dir is ``<state>/bundles``). The
    batch x seq must be the tier's: ExecuTorch programs have static shapes."""
    return export_bundle(spec, plan, runtime, Path(bundles_dir) / plan.hash / runtime, batch_size, seq_len,
                         cache_dir)


def cached_bundle(spec: ModelSpec, plan: Plan, runtime: str, batch_size: int = 8, seq_len: int = 64,
                  cache_dir: str | Path | None = None, xnnpack: bool = True) -> Path:
    """The cache's bundle folder for this key, exported now if absent or failing verification.
    Exports go to a temporary folder renamed into place, so a crash leaves no half bundle."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    key = bundle_key(spec, plan, runtime, batch_size, seq_len) + ("-xnnpack" if xnnpack and runtime == "executorch" else "")
    folder = root / key
    if folder.is_dir():
        try:
            read_bundle(folder, spec.hash, plan.hash, runtime)
            return folder
        except UserError:
            shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        _export(spec, plan, runtime, tmp, batch_size, seq_len, xnnpack)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir():  # another process won the race: its bundle is as good
            return folder
        raise
    return folder


def _export(spec: ModelSpec, plan: Plan, runtime: str, folder: Path, batch_size: int, seq_len: int,
            xnnpack: bool) -> None:
    write_bundle(plan.build(spec.gpt_config()), spec, plan, runtime, folder, batch_size, seq_len, xnnpack)


def write_bundle(model: torch.nn.Module, spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, folder: Path,
                 batch_size: int, seq_len: int, xnnpack: bool = True) -> None:
    """Export ``model``, ``plan`` built (a submodel; or a LoRA plan over its base, whose frozen
    weights the bundle then carries and only the adapter travels), with its manifest."""
    if runtime == "ort":
        from stamen.export.ort import export_ort

        exported = export_ort(model, folder)
    else:
        from stamen.export.executorch import export_executorch

        exported = export_executorch(model, folder, batch_size, seq_len, xnnpack)
    tools = exporter_versions(runtime)
    if runtime == "executorch":  # the app must link the XNNPACK backend to run a delegated program
        tools["backend"] = "xnnpack" if xnnpack else "portable"
    manifest = Manifest(spec.name, spec.hash, plan.to_dict(), plan.hash, runtime, tools,
                        exported.inputs, exported.layout_of, exported.params,
                        file_entries(folder, exported.files))
    write_manifest(folder, manifest)
