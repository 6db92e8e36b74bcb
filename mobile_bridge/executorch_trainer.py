"""Trains an ExecuTorch bundle with the ExecuTorch runtime alone (no stamen model code).

A new version's weights are written straight into a private copy of the bundle's ``.ptd`` at
the byte offsets the manifest lists -- exactly what a phone app does -- and the program is
reloaded; the ``.pte`` is never re-exported. After the first ``forward_backward`` the runtime's
trainable parameters are exposed as tensors that alias its memory: the optimizer updates
them in place."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from stamen.mobile_bridge.manifest import BundleError, Manifest
from stamen.mobile_bridge.weights import check_weights

PROGRAM, WEIGHTS = "program.pte", "weights.ptd"


class ExecuTorchTrainer:
    def __init__(self, folder: str | Path, manifest: Manifest, threads: int | None = None) -> None:
        """``threads``: size of ExecuTorch's (process-wide) thread pool, which XNNPACK-delegated
        parts use (None: leave it); the portable kernels run on the calling thread."""
        folder = Path(folder)
        if threads is not None:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        if manifest.runtime != "executorch":
            raise BundleError(f"bundle {folder} is for {manifest.runtime}, not executorch")
        self.manifest = manifest
        self.shape = tuple(manifest.inputs[0]["shape"])
        self.names = {s.key: s.name for s in manifest.params} | {s.name: s.name for s in manifest.params}
        self._dir = tempfile.TemporaryDirectory(prefix="stamen-et-")
        self.program = Path(self._dir.name) / PROGRAM
        self.weights = Path(self._dir.name) / WEIGHTS
        shutil.copyfile(folder / PROGRAM, self.program)
        shutil.copyfile(folder / manifest.layout_of, self.weights)
        self._reload()

    def _reload(self) -> None:
        from executorch.extension.pybindings.portable_lib import _load_for_executorch
        from executorch.extension.training import TrainingModule

        self.module = TrainingModule(_load_for_executorch(str(self.program), str(self.weights)))
        self._params: dict[str, torch.Tensor] | None = None

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        check_weights(self.manifest, weights)
        with open(self.weights, "r+b") as f:
            for s in self.manifest.params:
                data = np.ascontiguousarray(weights[s.name].detach().cpu().numpy(), dtype=np.float32).tobytes()
                f.seek(s.offset)
                f.write(data)
        self._reload()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if tuple(x.shape) != self.shape:
            raise BundleError(f"this ExecuTorch program trains batches of {self.shape}, got {tuple(x.shape)}")
        out = self.module.forward_backward("forward", (x.contiguous(), y.contiguous()))
        if self._params is None:
            self._params = {self.names[k]: t for k, t in self.module.named_parameters().items()}
        return float(out[0])

    def parameters(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            raise RuntimeError("ExecuTorch exposes parameters only after a forward_backward")
        return self._params

    def gradients(self) -> dict[str, torch.Tensor]:
        return {self.names[k]: g for k, g in self.module.named_gradients().items()}

    def commit(self) -> None:
        """Nothing to do: the optimizer wrote into the runtime's own memory."""

    def trained_weights(self) -> dict[str, torch.Tensor]:
        if self._params is None:  # not trained since the last load: the weights are the file's
            return {s.name: self._read(s) for s in self.manifest.trainable()}
        return {n: t.clone() for n, t in self._params.items()}

    def _read(self, slot) -> torch.Tensor:
        with open(self.weights, "rb") as f:
            f.seek(slot.offset)
            raw = f.read(slot.nbytes)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(slot.shape)
