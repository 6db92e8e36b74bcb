"""Local training of many virtual devices at once, giving each exactly what it would get alone.

Devices that share a plan, a base version and a step offset start from the same weights and
run the same program; only their data differs. So their trainable tensors are stacked along a
leading device axis and ``_stacked_hidden`` runs ``GPT.hidden`` for all of them at once: every
Linear is one ``baddbmm`` over the stacked weights (bias fused) instead of a thousand tiny
matmuls, and attention, which has no weights, runs over all devices' sequences in PyTorch's
fused CPU kernel. (It replaced ``torch.func.vmap`` of ``functional_call``, whose batching rules
split each LayerNorm and Linear into extra passes over memory and forced the unfused attention
kernel: half the step.) The loss that is
back-propagated is the *sum* of the per-device mean losses; device d's slice of the stacked
tensors only touches device d's loss, so each slice gets exactly its own gradient. Clipping is
done per device (each slice's own global norm), and AdamW/SGD are elementwise, so running
``torch.optim`` over the stacked tensors is exactly per-device AdamW/SGD. Frozen tensors are
shared, not stacked: memory grows with the devices in a group, never with the population.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``nn.Linear`` ``name`` applied to each device's rows ``x`` [D, N, in]: one batched matmul
    over stacked weights [D, out, in], or one matmul over a shared (frozen) weight [out, in]."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if weight.dim() == 3 and bias is not None and bias.dim() == 2:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    y = torch.bmm(x, weight.transpose(1, 2)) if weight.dim() == 3 else x @ weight.T
    return y if bias is None else y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)


def _layer_norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``nn.LayerNorm`` ``name`` (eps 1e-5) on ``x`` [D, N, d], its scale and shift per device
    when they are stacked."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if weight.dim() == 1 and (bias is None or bias.dim() == 1):
        return F.layer_norm(x, x.shape[-1:], weight, bias)
    scale = weight.unsqueeze(1) if weight.dim() == 2 else weight
    if bias is None:
        return F.layer_norm(x, x.shape[-1:]) * scale
    return torch.addcmul(bias.unsqueeze(1) if bias.dim() == 2 else bias, F.layer_norm(x, x.shape[-1:]), scale)


def _stacked_hidden(model: nn.Module, w: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """``model.hidden`` (a ``GPT``) for D devices at once: ``idx`` [D, B, T] and each weight in
    ``w`` either stacked [D, ...] (it trains) or shared (frozen). Returns [D, B·T, d], the final
    LayerNorm's output, which ``_head_loss`` turns into losses. The same arithmetic as
    ``GPT.hidden`` written over stacked weights; ``tests/test_batched.py`` holds it to it."""
    D, B, T = idx.shape
    wte, wpe = w["wte.weight"], w["wpe.weight"]
    tok = wte[torch.arange(D, device=idx.device).view(D, 1, 1), idx] if wte.dim() == 3 else F.embedding(idx, wte)
    pos = wpe[:, :T].unsqueeze(1) if wpe.dim() == 3 else wpe[:T]
    x = (tok + pos).view(D, B * T, -1)
    for i, block in model.blocks.items():
        p = f"blocks.{i}"
        heads, hd = block.attn.n_head, block.attn.head_dim
        qkv = _linear(_layer_norm(x, w, f"{p}.ln_1"), w, f"{p}.attn.c_attn")
        q, k, v = (t.reshape(D * B, T, heads, hd).transpose(1, 2) for t in qkv.split(heads * hd, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + _linear(y.transpose(1, 2).reshape(D, B * T, heads * hd), w, f"{p}.attn.c_proj")
        m = _linear(_layer_norm(x, w, f"{p}.ln_2"), w, f"{p}.mlp.c_fc")
        x = x + _linear(F.gelu(m, approximate="tanh"), w, f"{p}.mlp.c_proj")
    return _layer_norm(x, w, "ln_f")


CHUNK_BYTES = 1 << 19  # logits per chunk of _head_loss: half a MiB, held in a core's L2 cache


@torch.no_grad()
def _head_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each device's mean cross-entropy of ``h @ w.T`` against ``y``, with its gradients, in one
    pass over cache-sized chunks of devices.

    ``h`` [D, N, d] is the final hidden state, ``w`` the head ([V, d], shared, or [D, V, d],
    each device's own) and ``y`` [D, N] the targets. The loss is the mean over a device's N
    tokens of logsumexp(z) − z[y], so its gradient in the logits is (softmax(z) − onehot(y)) / N,
    and the chain rule gives the gradients in ``h`` (that @ w) and in ``w`` (its transpose @ h).
    Computing them here means the logits of a whole group ([D·N, V]: 26 MiB for 100 phones) are
    never written to memory and read back three times (forward, log-softmax backward, nll
    backward), which was half a step. Returns the losses [D], the gradient in ``h`` and the
    gradient in ``w`` (None when ``w`` is shared, i.e. frozen)."""
    D, N, _ = h.shape
    V = w.shape[-2]
    own = w.dim() == 3
    k = max(1, CHUNK_BYTES // (4 * N * V))
    losses = torch.empty(D, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h)
    grad_w = torch.empty_like(w) if own else None
    for i in range(0, D, k):
        hc, yc = h[i:i + k], y[i:i + k].unsqueeze(-1)
        wc = w[i:i + k] if own else w
        z = hc @ wc.transpose(-1, -2)  # [k, N, V]
        z.sub_(z.amax(-1, keepdim=True))  # z − max: exp cannot overflow, and one exp serves both
        p = z.exp()
        total = p.sum(-1, keepdim=True)
        losses[i:i + k] = (total.log() - z.gather(-1, yc)).mean((1, 2))  # logsumexp(z) − z[y]
        p.div_(total)
        p.scatter_add_(-1, yc, torch.full_like(yc, -1, dtype=p.dtype)).div_(N)
        torch.matmul(p, wc, out=grad_h[i:i + k])
        if own:
            torch.matmul(p.transpose(-1, -2), hc, out=grad_w[i:i + k])
    return losses, grad_h, grad_w


def train_batched(
    model: nn.Module,
    batches: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor]]],
    steps: int,
    cfg: TrainConfig,
    step_offset: int = 0,
) -> BatchedResult:
    """Train ``len(batches)`` devices for ``steps`` steps, each from ``model``'s current weights
    on its own batch stream, as ``core.train.train_steps`` would train each one alone with a
    fresh optimizer. ``model`` (a ``GPT``, e.g. ``plan.build(cfg)`` loaded with the base
    weights) is not changed; tensors with ``requires_grad=False`` stay frozen and shared.

    With ``torch.get_num_threads()`` = T > 1 the devices are split into T parts, each trained
    single-threaded in its own thread on its own copy of ``model``: devices are independent, so
    this changes no result, and it keeps both cores busy where intra-op threads would wait at a
    barrier after every one of a step's small ops."""
    n = len(batches)
    if n == 0 or steps < 1:
        raise UserError(f"batched training needs at least one device and one step, got {n} devices, {steps} steps")
    threads = torch.get_num_threads()
    if threads == 1 or n == 1:
        return _train(model, batches, steps, cfg, step_offset)
    parts = [list(batches[i * n // threads:(i + 1) * n // threads]) for i in range(min(threads, n))]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            done = list(pool.map(lambda part: _train(copy.deepcopy(model), part, steps, cfg, step_offset), parts))
    finally:
        torch.set_num_threads(threads)
    return BatchedResult({k: torch.cat([r.weights[k] for r in done]) for k in done[0].weights},
                         torch.cat([r.losses for r in done]), done[0].tokens)


def _train(
    model: nn.Module,
    batches: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor]]],
    steps: int,
    cfg: TrainConfig,
    step_offset: int,
) -> BatchedResult:
    """``train_batched`` on the calling thread."""
    n = len(batches)
    _keep_freed_memory()
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    trainable = [k for k, p in params.items() if p.requires_grad]
    frozen = {k: p.detach() for k, p in params.items() if not p.requires_grad}
    stacked = {k: params[k].detach().unsqueeze(0).repeat(n, *([1] * params[k].dim())).requires_grad_()
               for k in trainable}
    leaves = list(stacked.values())
    opt = _optimizer(leaves, cfg)
    head = next(k for k, p in params.items() if p is model.lm_head.weight)  # "wte.weight" when tied
    every = {**frozen, **stacked}
    losses = torch.empty(n, steps)
    tokens = 0
    model.train()
    for i in range(steps):
        xs, ys = zip(*(next(b) for b in batches))
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step_offset + i)
        with autocast(device):
            h = _stacked_hidden(model, every, x)  # [devices, batch·seq, embd]
        w = every[head]
        loss, grad_h, grad_w = _head_loss(h.detach(), w.detach(), y.flatten(1))
        opt.zero_grad(set_to_none=True)
        if grad_w is not None:  # the head trains: its own gradient, plus the embedding's if tied
            w.grad = grad_w
        h.backward(grad_h.view_as(h))
        if cfg.grad_clip > 0:
            _clip_per_device([p.grad for p in leaves], cfg.grad_clip)
        opt.step()
        losses[:, i] = loss.float().cpu()
        tokens += y[0].numel()
    return BatchedResult({k: v.detach() for k, v in stacked.items()}, losses, tokens)
