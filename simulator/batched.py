"""Local training of many virtual devices at once, giving each exactly what it would get alone.

Devices that share a plan, a base version and a step offset start from the same weights and
run the same program; only their data differs. So their trainable tensors are stacked along a
leading device axis and one ``torch.func.vmap`` of ``functional_call`` runs them all: every
Linear becomes one batched matmul instead of a thousand tiny ones. The loss that is
back-propagated is the *sum* of the per-device mean losses; device d's slice of the stacked
tensors only touches device d's loss, so each slice gets exactly its own gradient. Clipping is
done per device (each slice's own global norm), and AdamW/SGD are elementwise, so running
``torch.optim`` over the stacked tensors is exactly per-device AdamW/SGD. Frozen tensors are
shared, not stacked: memory grows with the devices in a group, never with the population.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from stamen.core.errors import UserError
from stamen.core.train import TrainConfig, autocast, lr_at


@dataclass
class BatchedResult:
    """What a group of devices trained: their final trainable tensors stacked ``[D, ...]``,
    each device's loss per step ``[D, steps]`` and the tokens each device trained on."""

    weights: dict[str, torch.Tensor]
    losses: torch.Tensor
    tokens: int

    def delta(self, base: dict[str, torch.Tensor], device: int) -> dict[str, torch.Tensor]:
        """Device ``device``'s pseudo-gradient Δ = θ_base − θ_local, as its Update carries it."""
        return {n: base[n] - w[device] for n, w in self.weights.items()}


def _optimizer(stacked: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``core.train.make_optimizer`` for stacked tensors: weight decay goes to what was a
    matrix *before* the device axis was added."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(stacked, lr=cfg.lr, momentum=cfg.momentum)
    decay = [p for p in stacked if p.dim() - 1 >= 2]
    no_decay = [p for p in stacked if p.dim() - 1 < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


@functools.cache
def _keep_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 32 MiB in the heap, once per process.

    A batched step allocates and frees the same tens of MiB of activations (the logits of 100
    devices are 26 MiB) every step. Under glibc's default each such block is a fresh mmap that
    is unmapped on free, so the kernel zero-fills its pages again on first touch; that was 40 %
    of a phone-workload step (bench/simulator.py: 126 → 223 device updates/s). 32 MiB is the
    largest threshold glibc accepts. Nothing to do where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


@torch.no_grad()
def _clip_per_device(grads: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` applied to each device's slice separately (same formula)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]), dim=0)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def train_batched(
    model: nn.Module,
    batches: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor]]],
    steps: int,
    cfg: TrainConfig,
    step_offset: int = 0,
) -> BatchedResult:
    """Train ``len(batches)`` devices for ``steps`` steps, each from ``model``'s current weights
    on its own batch stream, as ``core.train.train_steps`` would train each one alone with a
    fresh optimizer. ``model`` (e.g. ``plan.build(cfg)`` loaded with the base weights) is not
    changed; tensors with ``requires_grad=False`` stay frozen and shared."""
    n = len(batches)
    if n == 0 or steps < 1:
        raise UserError(f"batched training needs at least one device and one step, got {n} devices, {steps} steps")
    _keep_freed_memory()
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    trainable = [k for k, p in params.items() if p.requires_grad]
    frozen = {k: p.detach() for k, p in params.items() if not p.requires_grad}
    stacked = {k: params[k].detach().unsqueeze(0).repeat(n, *([1] * params[k].dim())).requires_grad_()
               for k in trainable}
    leaves = list(stacked.values())
    opt = _optimizer(leaves, cfg)

    def one_logits(own: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (own, frozen), (x,))

    per_device_logits = vmap(one_logits, in_dims=(0, 0))
    losses = torch.empty(n, steps)
    tokens = 0
    model.train()
    for i in range(steps):
        xs, ys = zip(*(next(b) for b in batches))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step_offset + i)
        # The math kernel: the fused CPU attention kernels have no vmap rule and would fall
        # back to a slow loop over devices.
        with autocast(device), sdpa_kernel(SDPBackend.MATH):
            logits = per_device_logits(stacked, x)  # [devices, batch, seq, vocab]
            # The cross-entropy runs outside vmap, as one over every device's tokens (its
            # batching rule made log-softmax and its backward 40 % of a step); each device's
            # loss is the mean over its own tokens, as the model's forward computes it.
            loss = F.cross_entropy(logits.flatten(0, 2), y.flatten(), reduction="none").view(n, -1).mean(1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
        if cfg.grad_clip > 0:
            _clip_per_device([p.grad for p in leaves], cfg.grad_clip)
        opt.step()
        losses[:, i] = loss.detach().float().cpu()
        tokens += y[0].numel()
    return BatchedResult({k: v.detach() for k, v in stacked.items()}, losses, tokens)
