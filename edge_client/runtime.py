"""The one interface every local-training backend speaks, and its eager-torch implementation.

A client (or the simulator) hands a runtime the submodel weights of a task, asks it to train a
number of steps on a batch stream, and reads back the trainable tensors; it never needs to know
whether the steps ran in eager torch, ONNX Runtime Training or ExecuTorch. All tensors are keyed
by GLOBAL names (``blocks.3.attn.c_attn.weight``), shaped like the plan's extracted slices.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stamen.core.lora import LoraSpace, load_adapter
from stamen.core.model import load_weights
from stamen.core.train import TrainConfig, TrainResult, make_optimizer, train_steps

if TYPE_CHECKING:
    from stamen.core.lora import LoraPlan
    from stamen.core.plan import Model, Plan

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
OnStep = Callable[[int, float], None]


class Runtime(ABC):
    """Trains one plan's submodel. ``name`` is what a Task's ``runtime`` field asks for."""

    name: str

    @abstractmethod
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load the submodel's weights (``plan.extract``: every kept tensor, global names)."""

    @abstractmethod
    def train(self, batches: Batches, steps: int, cfg: TrainConfig, step_offset: int = 0,
              on_step: OnStep | None = None) -> TrainResult:
        """Train ``steps`` steps; the lr follows the global schedule from ``step_offset``."""

    @abstractmethod
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors after training, on the CPU, global names."""


class TorchRuntime(Runtime):
    """Eager PyTorch (bf16 autocast on CUDA cards that have it, ``core.train.compute_dtype``):
    GPU nodes, laptops, Jetsons, the simulator.

    With ``keep_optimizer`` the inner optimizer and its state survive from one task to the
    next, as DiLoCo/Photon keep a worker's AdamW moments across rounds; the server's new
    weights are copied into the same parameters, so the moments stay attached to them."""

    name = "torch"

    def __init__(self, cfg: "Model", plan: "Plan | LoraPlan", device: torch.device | str = "cpu",
                 keep_optimizer: bool = False, base: torch.nn.Module | None = None) -> None:
        """``cfg`` is a GPT's config for a submodel plan, or the global adapter's ``LoraSpace``
        for a LoRA plan, which then adapts ``base`` (the pretrained model, changed in place)."""
        self.plan = plan
        self.lora = isinstance(cfg, LoraSpace)
        if self.lora and base is None:
            raise ValueError("a LoRA plan needs the base model it adapts")
        self.model = (plan.build(base, cfg) if self.lora else plan.build(cfg)).to(device)
        self.trainable = plan.trainable(cfg)
        self.keep_optimizer = keep_optimizer
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_cfg: TrainConfig | None = None

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        (load_adapter if self.lora else load_weights)(self.model, weights)

    def _optimizer_for(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """A fresh optimizer per task, unless kept; a changed optimizer setting starts afresh."""
        if self.keep_optimizer and self.optimizer is not None and self._optimizer_cfg == cfg:
            return self.optimizer
        self.optimizer, self._optimizer_cfg = make_optimizer(self.model, cfg), cfg
        return self.optimizer

    def train(self, batches: Batches, steps: int, cfg: TrainConfig, step_offset: int = 0,
              on_step: OnStep | None = None) -> TrainResult:
        return train_steps(self.model, batches, steps, cfg, optimizer=self._optimizer_for(cfg),
                           step_offset=step_offset, on_step=on_step)

    def save_optimizer(self, path: Path) -> None:
        """Write the kept optimizer and its setting, atomically (a crash leaves the old file):
        for a node that runs each task in a new process (a Flower SuperNode)."""
        if self.optimizer is None or self._optimizer_cfg is None:
            return
        tmp = path.with_suffix(".tmp")
        torch.save({"cfg": dataclasses.asdict(self._optimizer_cfg), "state": self.optimizer.state_dict()}, tmp)
        os.replace(tmp, path)

    def load_optimizer(self, path: Path, cfg: TrainConfig) -> bool:
        """Resume the optimizer saved at ``path`` if it was made with ``cfg`` (a changed
        setting starts afresh, as within one process). Returns whether it resumed."""
        if not path.is_file():
            return False
        saved = torch.load(path, map_location=next(self.model.parameters()).device, weights_only=True)
        if saved["cfg"] != dataclasses.asdict(cfg):
            return False
        self._optimizer_for(cfg).load_state_dict(saved["state"])
        return True

    def trained_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in self.trainable}
