"""Export a plan for a runtime into a bundle folder (program + weights files + manifest),
through a cache: programs depend only on (model spec, plan, runtime, input shape, exporter
versions), never on a version's weights, so each is exported once and reused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from stamen.core.errors import UserError
from stamen.core.hf import hf_folder, is_hf, speaks_bytes
from stamen.core.model import ModelSpec
from stamen.core.lora import LoraPlan, described_space
from stamen.core.plan import Plan
from stamen.core.wire import BUNDLE_RUNTIMES
from stamen.export.executorch import XNNPACK_KEY
from stamen.mobile_bridge.manifest import Manifest, file_entries, read_bundle, write_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_CACHE = Path(os.environ.get("STAMEN_CACHE", Path.home() / ".cache" / "stamen")) / "exports"


def exporter_versions(runtime: str) -> dict[str, str]:
    tool = "onnxruntime-training" if runtime == "ort" else "executorch"
    return {"torch": torch.__version__, tool: version(tool)}


def bundle_key(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, batch_size: int, seq_len: int,
               lora: dict | None = None) -> str:
    """The cache folder name. ORT programs have dynamic shapes, so the shape is not part of
    their key; ExecuTorch programs are traced for one batch x seq. A LoRA plan's program also
    depends on the adapter space (targets, r_max, alpha: the scale is baked in)."""
    shape = "dyn" if runtime == "ort" else f"{batch_size}x{seq_len}"
    tools = "-".join(f"{k}{v}" for k, v in sorted(exporter_versions(runtime).items()))
    space = "" if lora is None else "-" + hashlib.sha256(json.dumps(lora, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.hash}-{plan.hash}{space}-{runtime}-{shape}-{tools}".replace("+", "_")


def export_bundle(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, out_dir: str | Path, batch_size: int = 8,
                  seq_len: int = 64, cache_dir: str | Path | None = None, xnnpack: bool = True,
                  lora: dict | None = None) -> Path:
    """Write the bundle of ``plan`` for ``runtime`` into ``out_dir`` (created; existing bundle
    files replaced) and return it. Backs ``stamen export``. The exported program comes from
    the cache when it holds a verified copy. ``xnnpack`` (ExecuTorch only) delegates the
    matrix products to XNNPACK: 4-6x faster than the portable kernels (bench/runtimes.py).
    A LoRA plan needs ``lora``, the federation's adapter space (``LoraSpace.describe()``)
    over ``spec``, the base, whose weights the bundle carries."""
    if runtime not in BUNDLE_RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}: use one of {', '.join(BUNDLE_RUNTIMES)}")
    if isinstance(plan, LoraPlan):
        if lora is None:
            raise UserError(f"plan {plan.name!r} is a LoRA plan: its bundle needs the federation's adapter space")
        if runtime not in plan.runtimes:
            raise UserError(f"LoRA plan {plan.name!r} (base {plan.base}) trains on {', '.join(plan.runtimes)}, "
                            f"not {runtime}: bundles of a Hugging Face base are ExecuTorch programs over an fp32 base")
    elif spec.gpt_config() is None:
        raise UserError(f"model {spec.name!r} is not a stamen GPT: only GPT plans can be exported")
    cached = cached_bundle(spec, plan, runtime, batch_size, seq_len, cache_dir, xnnpack, lora)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def publish_bundle(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, bundles_dir: str | Path, batch_size: int,
                   seq_len: int, cache_dir: str | Path | None = None, lora: dict | None = None) -> Path:
    """Export into the server's layout, ``<bundles_dir>/<plan hash>/<runtime>/``, which
    ``GET /v1/bundles/{plan}/{runtime}`` serves (bundles_dir is ``<state>/bundles``). The
    batch x seq must be the tier's: ExecuTorch programs have static shapes."""
    return export_bundle(spec, plan, runtime, Path(bundles_dir) / plan.hash / runtime, batch_size, seq_len,
                         cache_dir, lora=lora)


def cache_folder(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, batch_size: int = 8, seq_len: int = 64,
                 cache_dir: str | Path | None = None, xnnpack: bool = True, lora: dict | None = None) -> Path:
    """Where the cache keeps this key's bundle, whether or not it is there yet: a folder
    appears there only whole (``cached_bundle`` renames a finished export into place)."""
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    return root / (bundle_key(spec, plan, runtime, batch_size, seq_len, lora)
                   + (f"-{XNNPACK_KEY}" if xnnpack and runtime == "executorch" else ""))


def cached_bundle(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, batch_size: int = 8, seq_len: int = 64,
                  cache_dir: str | Path | None = None, xnnpack: bool = True, lora: dict | None = None) -> Path:
    """The cache's bundle folder for this key, exported now if absent or failing verification.
    Exports go to a temporary folder renamed into place, so a crash leaves no half bundle."""
    folder = cache_folder(spec, plan, runtime, batch_size, seq_len, cache_dir, xnnpack, lora)
    root, key = folder.parent, folder.name
    if folder.is_dir():
        try:
            read_bundle(folder, spec.hash, plan.hash, runtime)
            return folder
        except UserError:
            shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        _export(spec, plan, runtime, tmp, batch_size, seq_len, xnnpack, lora)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.is_dir():  # another process won the race: its bundle is as good
            return folder
        raise
    return folder


def _export(spec: ModelSpec, plan: Plan | LoraPlan, runtime: str, folder: Path, batch_size: int, seq_len: int,
            xnnpack: bool, lora: dict | None) -> None:
    if isinstance(plan, LoraPlan):
        model = plan.build(spec.build(), described_space(spec.build(weights=False), lora))
    else:
        model = plan.build(spec.gpt_config())
    write_bundle(model, spec, plan, runtime, folder, batch_size, seq_len, xnnpack)


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
    files = exported.files + (_tokenizer(spec, folder) if isinstance(plan, LoraPlan) else ())
    tools = exporter_versions(runtime)
    if runtime == "executorch":  # the app must link the XNNPACK backend to run a delegated program
        tools["backend"] = "xnnpack" if xnnpack else "portable"
    manifest = Manifest(spec.name, spec.hash, plan.to_dict(), plan.hash, runtime, tools,
                        exported.inputs, exported.layout_of, exported.params,
                        file_entries(folder, files))
    write_manifest(folder, manifest)


def _tokenizer(spec: ModelSpec, folder: Path) -> tuple[str, ...]:
    """Copy a Hugging Face base's tokenizer (``tokenizer.json``, with ``tokenizer_config.json``
    naming its end token) into a LoRA bundle: a device encodes its instruction data in the
    base's tokens with the ``tokenizers`` library alone. None for a byte-level base (a stamen
    model folder) or a base without a fast tokenizer: such a device encodes bytes."""
    if not is_hf(spec.name):
        return ()
    base = hf_folder(spec.name)
    if speaks_bytes(base):
        return ()
    names = tuple(n for n in TOKENIZER_FILES if (base / n).is_file())
    if names != TOKENIZER_FILES:
        return ()
    for n in names:
        shutil.copyfile(base / n, folder / n)
    return names
