"""The one local-training loop: centralized baselines, GPU nodes, laptops and the simulator's
reference path all train through ``train_steps``.

The learning-rate schedule is a function of a *global* step (``step_offset`` + local step), so
a federation whose clients each run a few local steps still follows one warm-up + cosine
schedule, as Photon does with its server step counter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from stamen.core.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    total_steps: int = 2000  # length of the global schedule; constant min lr past it
    schedule: str = "cosine"  # "cosine" or "constant"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.0  # SGD only
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"unknown optimizer {self.optimizer!r}: use adamw or sgd")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}: use cosine or constant")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at a global step: linear warm-up, then cosine to lr * min_lr_ratio."""
    if cfg.schedule == "constant":
        return cfg.lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * decay)) * (cfg.lr - floor)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (nanoGPT's split), or plain SGD."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


BF16_CAPABILITY = (8, 0)  # the first CUDA cards with bf16 tensor cores (Ampere, Jetson Orin)


def compute_dtype(device: torch.device) -> torch.dtype:
    """What training's products compute in: bf16 on a CUDA card with bf16 matmuls (compute
    capability 8.0 on: GPU nodes), fp32 everywhere else. Older cards (T4, V100, RTX 20xx, Jetson
    Xavier) have no bf16 tensor cores: at best bf16 is emulated there, no faster than fp32 and
    lossier (fp16 would need a loss scaler; not built). On a CPU bf16 is slower and lossy."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_CAPABILITY:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device):
    """Autocast to ``compute_dtype`` where that is not fp32 (CUDA); nothing on a CPU."""
    dtype = compute_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    step_offset: int = 0,
    on_step=None,
) -> TrainResult:
    """Train ``steps`` steps in place. Pass the same ``optimizer`` again to keep its state
    across calls (a GPU node's inner AdamW across tasks); ``on_step(i, loss)`` reports progress."""
    device = next(model.parameters()).device
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    result = TrainResult(0, 0)
    for i in range(steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(cfg, step_offset + i)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        result.steps += 1
        result.tokens += y.numel()
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(i, result.losses[-1])
    return result


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss (nats/token) over a fixed list of batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / len(batches)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
