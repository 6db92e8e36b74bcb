"""The training loop of the exported runtimes, shared by the edge client's OrtRuntime and
ExecuTorchRuntime and by the reference device.

The runtime computes the loss and the gradients; the optimizer step runs here in torch over
tensors that alias (ExecuTorch) or mirror (ORT) the runtime's parameters. So the learning
rate per step (``lr_at``), gradient clipping (``clip_grad_norm_``), SGD with momentum and
AdamW with nanoGPT's decay split are torch's own code, exactly as in ``core.train`` -- not a
runtime's approximation of them (ORT's AdamW has other defaults; ExecuTorch ships only SGD)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn as nn

from stamen.core.train import TrainConfig, TrainResult, lr_at, make_optimizer


class Trainer(Protocol):
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float: ...
    def parameters(self) -> dict[str, torch.Tensor]: ...  # trainable, aliasing the runtime's
    def gradients(self) -> dict[str, torch.Tensor]: ...  # of the last forward_backward
    def commit(self) -> None: ...  # make in-place parameter updates visible to the runtime


def train_loop(trainer: Trainer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
               cfg: TrainConfig, step_offset: int = 0,
               on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """``steps`` optimizer steps; the same arithmetic as ``core.train.train_steps``."""
    result = TrainResult(0, 0)
    holder: nn.ParameterList | None = None
    opt = None
    for i in range(steps):
        x, y = next(batches)
        loss = trainer.forward_backward(x, y)
        if opt is None:  # ExecuTorch exposes its parameters only after a first step
            params = trainer.parameters()
            holder = nn.ParameterList(nn.Parameter(t) for t in params.values())
            names = list(params)
            opt = make_optimizer(holder, cfg)
        grads = trainer.gradients()
        for name, p in zip(names, holder):
            p.grad = grads[name]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step_offset + i)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(holder), cfg.grad_clip)
        opt.step()
        trainer.commit()
        result.steps += 1
        result.tokens += y.numel()
        result.losses.append(loss)
        if on_step is not None:
            on_step(i, loss)
    return result
