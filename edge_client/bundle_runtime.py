"""The edge client's Runtime over an exported bundle: ORT and ExecuTorch differ only in the
trainer that drives their library (``mobile_bridge``); loading, verification and the
training loop are the same."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from stamen.core.train import TrainConfig, TrainResult
from stamen.edge_client.runtime import Batches, OnStep, Runtime
from stamen.mobile_bridge.loop import train_loop
from stamen.mobile_bridge.manifest import read_bundle


class BundleRuntime(Runtime):
    """Trains a bundle folder (``mobile_bridge.bundle``). The bundle is verified on load --
    and refused if built for another model or plan when ``spec_hash``/``plan_hash`` are given
    -- with a ``BundleError`` the client answers by downloading it again. ``threads`` caps
    the runtime's CPU threads (None: its default)."""

    trainer_class: type

    def __init__(self, bundle_dir: str | Path, spec_hash: str | None = None, plan_hash: str | None = None,
                 threads: int | None = None) -> None:
        self.manifest = read_bundle(bundle_dir, spec_hash, plan_hash, self.name)
        self.trainer = self.trainer_class(bundle_dir, self.manifest, threads)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.trainer.load(weights)

    def train(self, batches: Batches, steps: int, cfg: TrainConfig, step_offset: int = 0,
              on_step: OnStep | None = None) -> TrainResult:
        return train_loop(self.trainer, batches, steps, cfg, step_offset, on_step)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.trained_weights()


def available_runtimes(cuda: bool) -> tuple[str, ...]:
    """The runtimes this machine can run, preferred first -- what ``--runtime auto`` picks
    from. On CPU ORT trains faster than eager torch and ExecuTorch's portable kernels are
    several times slower (bench/runtimes.py); on CUDA eager torch (bf16) wins."""
    have = {"torch"} | {name for name, module in (("ort", "onnxruntime.training"),
                                                  ("executorch", "executorch.extension.training"))
                        if _importable(module)}
    order = ("torch", "ort", "executorch") if cuda else ("ort", "torch", "executorch")
    return tuple(r for r in order if r in have)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the parent package is missing
        return False
