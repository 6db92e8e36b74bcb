"""Trains an ORT bundle with onnxruntime-training alone (no stamen model code): what the
edge client's OrtRuntime and the reference device drive through ``loop.train_loop``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stamen.mobile_bridge.manifest import BundleError, Manifest
from stamen.mobile_bridge.weights import check_weights


class OrtTrainer:
    def __init__(self, folder: str | Path, manifest: Manifest, threads: int | None = None) -> None:
        """``threads``: ORT's intra-op threads (None: one per physical core)."""
        from onnxruntime import SessionOptions
        from onnxruntime.training.api import CheckpointState, Module

        folder = Path(folder)
        if manifest.runtime != "ort":
            raise BundleError(f"bundle {folder} is for {manifest.runtime}, not ort")
        self.manifest = manifest
        self.state = CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        options = SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.module = Module(str(folder / "training_model.onnx"), self.state, str(folder / "eval_model.onnx"),
                             session_options=options)
        self.module.train()
        self.slots = manifest.trainable()
        self._pull()

    def _pull(self) -> None:
        """Mirror ORT's trainable parameters in one flat torch buffer, viewed per tensor."""
        from onnxruntime import OrtValue

        self.flat = torch.from_numpy(self.module.get_contiguous_parameters(trainable_only=True).numpy().copy())
        self.views, at = {}, 0
        for s in self.slots:
            n = int(np.prod(s.shape))
            self.views[s.name] = self.flat[at:at + n].view(s.shape)
            at += n
        self._flat_ort = OrtValue.ortvalue_from_numpy(self.flat.numpy())  # aliases self.flat

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Every kept tensor of the plan (a new version), written into the session in place."""
        check_weights(self.manifest, weights)
        for s in self.manifest.params:
            self.state.parameters[s.key] = np.ascontiguousarray(weights[s.name].detach().cpu().numpy(), dtype=np.float32)
        self._pull()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.module.lazy_reset_grad()
        loss = self.module(np.ascontiguousarray(x.numpy()), np.ascontiguousarray(y.numpy()))
        return float(loss)

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.views

    def gradients(self) -> dict[str, torch.Tensor]:
        return {s.name: torch.from_numpy(self.state.parameters[s.key].grad) for s in self.slots}

    def commit(self) -> None:
        self.module.copy_buffer_to_parameters(self._flat_ort._ortvalue, trainable_only=True)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return {n: v.clone() for n, v in self.views.items()}
