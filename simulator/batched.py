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
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stamen.core.data import next_batches
from stamen.core.errors import UserError
from stamen.core.train import TrainConfig, autocast, lr_at


@dataclass
class BatchedResult:
    """What a group of devices trained: their final trainable tensors stacked ``[D, ...]``,
    each device's loss per step ``[D, steps]`` and the tokens each device trained on."""

    weights: dict[str, torch.Tensor]
    losses: torch.Tensor
    tokens: int

    def deltas(self, base: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each device's pseudo-gradient Δ = θ_base − θ_local, as its Update carries it. One
        subtraction per tensor over the stacked weights, each device's Δ a view of its row: a
        subtraction per device and tensor was 3 % of a 100-phone group's time."""
        stacked = {n: base[n] - w for n, w in self.weights.items()}
        return [{n: t[i] for n, t in stacked.items()} for i in range(len(self.losses))]


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


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.Linear`` ``name`` applied to each device's rows ``x`` [D, N, in], plus ``residual``
    [D, N, out] if given: one batched matmul over stacked weights [D, out, in] (bias fused), or
    one matmul over a shared (frozen) weight [out, in].

    With stacked weights and a residual, the matmul accumulates in place onto residual + bias:
    two [D, N, out] tensors written instead of three (the bias broadcast, the product, the sum),
    which at a hundred devices are passes to and from memory, not cache (2-4 % of a phone step,
    old and new alternating in one process). The same sum up to float rounding."""
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    if weight.dim() == 3 and bias is not None and bias.dim() == 2:
        if residual is not None:
            return torch.add(residual, bias.unsqueeze(1)).baddbmm_(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    y = torch.bmm(x, weight.transpose(1, 2)) if weight.dim() == 3 else x @ weight.T
    y = y if bias is None else y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
    return y if residual is None else residual + y


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm (eps 1e-5) without scale and shift. A weight of ones multiplies exactly and
    takes PyTorch's faster affine kernel (forward and backward on 100 phones' [100, 256, 64]:
    4.7 vs 8.1 ms, one thread, on the loaded 2-core machine)."""
    return F.layer_norm(x, x.shape[-1:], x.new_ones(x.shape[-1]))


def _own_affine(w: dict[str, torch.Tensor], ln: str) -> bool:
    """Whether LayerNorm ``ln``'s scale or shift is each device's own (stacked), so that
    ``_norm_linear`` folds it into the Linear that follows."""
    g, b = w[f"{ln}.weight"], w.get(f"{ln}.bias")
    return g.dim() == 2 or (b is not None and b.dim() == 2)


def _ln_out(x: torch.Tensor, w: dict[str, torch.Tensor], ln: str) -> torch.Tensor:
    """What ``_norm_linear`` feeds its Linear: ``x`` normalized, with ``ln``'s affine only when
    it is shared (a device's own affine is folded into the Linear's weights instead)."""
    if _own_affine(w, ln):
        return _normalize(x)
    return F.layer_norm(x, x.shape[-1:], w[f"{ln}.weight"], w.get(f"{ln}.bias"))


def _norm_linear(x: torch.Tensor, w: dict[str, torch.Tensor], ln: str, name: str,
                 normed: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.Linear`` ``name`` of ``nn.LayerNorm`` ``ln``'s output, for ``x`` [D, N, d];
    ``normed`` is ``_ln_out(x, w, ln)`` where the caller already has it.

    When the LayerNorm's scale g and shift b are each device's own, they are folded into the
    Linear, (n·g + b) Wᵀ + c = n (W·g)ᵀ + (W b + c), so the per-device affine costs a pass
    over the [D, out, in] weights instead of several over the [D, N, d] activations (autograd's
    backward of the broadcast multiply writes two full-size products and sums one). The same
    arithmetic up to float rounding; autograd carries the gradients back to W, g, b and c."""
    normed = _ln_out(x, w, ln) if normed is None else normed
    if not _own_affine(w, ln):
        return _linear(normed, w, name)
    g, b = w[f"{ln}.weight"], w.get(f"{ln}.bias")
    weight, bias = w[f"{name}.weight"], w.get(f"{name}.bias")
    folded = {f"{name}.weight": weight * g.unsqueeze(-2)}
    if b is not None:
        shift = (weight * b.unsqueeze(-2)).sum(-1)  # W b: a batched matmul of vectors pays MKL's per-matrix cost
        folded[f"{name}.bias"] = shift if bias is None else bias + shift
    elif bias is not None:
        folded[f"{name}.bias"] = bias
    return _linear(normed, folded, name)


class _Gelu(torch.autograd.Function):
    """``F.gelu(x, approximate="tanh")``, written x·σ(v) with v = x·(C1 + C3·x²): the same
    function (0.5·(1 + tanh(u)) = σ(2u)), but PyTorch's CPU sigmoid is three times faster
    than its tanh, which made GELU's forward and backward a tenth of a phone step (12.7 →
    7.8 ms on [100, 256, 64]). Saves x, σ(v) and the output x·σ(v) (which the next Linear's
    backward holds anyway), so the backward, σ + u·(1 − σ) with u = x·σ·(C1 + 3·C3·x²), needs
    no transcendental and five passes over memory."""

    C1 = 2 * math.sqrt(2 / math.pi)
    C3 = C1 * 0.044715

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.addcmul(x.new_tensor(_Gelu.C1), x, x, value=_Gelu.C3).mul_(x).sigmoid_()
        out = x * s
        ctx.save_for_backward(x, s, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, s, out = ctx.saved_tensors
        u = torch.addcmul(x.new_tensor(_Gelu.C1), x, x, value=3 * _Gelu.C3).mul_(out)
        return u.addcmul_(u, s, value=-1).add_(s).mul_(grad)


@dataclass
class _Inputs:
    """The first block's input x = wte[t] + wpe[p] and its ``_ln_out`` for every token t and
    position p, row t·T + p, where both embeddings and the first ln_1 are shared (frozen, as in
    every tier plan): a step then gathers its rows instead of adding the embeddings and
    normalizing (a pass over [D, B·T, d] and a LayerNorm each step; both identical row by row)."""

    x: torch.Tensor
    normed: torch.Tensor

    @staticmethod
    def build(model: nn.Module, w: dict[str, torch.Tensor], seq_len: int, step_rows: int) -> _Inputs | None:
        """The tables for ``seq_len``-token batches, or None where an embedding trains, or where
        a table would have more rows than the ``step_rows`` tokens of one step: then each costs
        no more memory than one of the step's activations, and building it no more than the
        first step saves (a large vocabulary or context never gets one). ``_ln_out`` is the
        same for every device: the plain normalization where the devices' ln_1 affines differ
        (they are folded downstream), the shared LayerNorm where ln_1 is frozen."""
        wte, wpe = w["wte.weight"], w["wpe.weight"]
        if wte.dim() != 2 or wpe.dim() != 2 or wte.shape[0] * seq_len > step_rows:
            return None
        ln = f"blocks.{next(iter(model.blocks))}.ln_1"
        x = (wte.unsqueeze(1) + wpe[:seq_len]).flatten(0, 1)
        return _Inputs(x, _ln_out(x, w, ln))


def _stacked_hidden(model: nn.Module, w: dict[str, torch.Tensor], idx: torch.Tensor,
                    inputs: _Inputs | None = None) -> torch.Tensor:
    """``model.hidden`` (a ``GPT``) but its final LayerNorm, for D devices at once: ``idx``
    [D, B, T] and each weight in ``w`` either stacked [D, ...] (it trains) or shared (frozen);
    ``inputs`` the first block's input tables where ``_Inputs.build`` made them.
    Returns [D, B·T, d], the last block's output, which ``_head_loss`` normalizes (``ln_f``)
    and turns into losses. The same arithmetic as ``GPT.hidden`` written over stacked weights;
    ``tests/test_batched.py`` holds it to it."""
    D, B, T = idx.shape
    normed = None
    if inputs is not None:
        rows = (idx * T + torch.arange(T, device=idx.device)).view(-1)
        x = inputs.x.index_select(0, rows).view(D, B * T, -1)
        normed = inputs.normed.index_select(0, rows).view(D, B * T, -1)
    else:
        wte, wpe = w["wte.weight"], w["wpe.weight"]
        tok = wte[torch.arange(D, device=idx.device).view(D, 1, 1), idx] if wte.dim() == 3 else F.embedding(idx, wte)
        pos = wpe[:, :T].unsqueeze(1) if wpe.dim() == 3 else wpe[:T]
        x = tok.add_(pos).view(D, B * T, -1)  # tok is a fresh tensor: no second [D, B, T, d] is written
    for i, block in model.blocks.items():
        p = f"blocks.{i}"
        heads, hd = block.attn.n_head, block.attn.head_dim
        qkv = _norm_linear(x, w, f"{p}.ln_1", f"{p}.attn.c_attn", normed)
        normed = None
        q, k, v = (t.reshape(D * B, T, heads, hd).transpose(1, 2) for t in qkv.split(heads * hd, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = _linear(y.transpose(1, 2).reshape(D, B * T, heads * hd), w, f"{p}.attn.c_proj", residual=x)
        m = _norm_linear(x, w, f"{p}.ln_2", f"{p}.mlp.c_fc")
        x = _linear(_Gelu.apply(m), w, f"{p}.mlp.c_proj", residual=x)
    return x


LOG2E, LN2 = 1 / math.log(2), math.log(2)
CHUNK_BYTES = 2 << 20  # logits per chunk of _head_loss: 2 MiB, within a core's share of L3 (1 MiB: 6 % slower)
EXP2_SAFE = 60.0  # a bound on |z| (base 2) under which Σ exp2(z) over a vocabulary neither overflows nor underflows


def _logit_bound(g: torch.Tensor, b: torch.Tensor | None, w2: torch.Tensor) -> float:
    """An upper bound on |log2(e)·logit| over every token of every device, for LayerNorm scale
    ``g`` and shift ``b`` and the head ``w2`` (already times log2(e)): a normalized row has norm
    at most √d, so |h| ≤ √d·max|g| + |b| and |h·w_v| ≤ |h|·max_v |w_v| (Cauchy–Schwarz)."""
    h = math.sqrt(w2.shape[-1]) * g.abs().amax(-1)
    if b is not None:
        h = h + torch.linalg.vector_norm(b, dim=-1)
    return float((h * torch.linalg.vector_norm(w2, dim=-1).amax(-1)).max())


@dataclass
class _HeadGrads:
    """What ``_head_loss`` returns: each device's loss [D] and the gradients in the last
    block's output and in ln_f's scale, shift and the head (None where that tensor is shared,
    i.e. frozen)."""

    losses: torch.Tensor
    x: torch.Tensor
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    head: torch.Tensor | None


@torch.no_grad()
def _head_loss(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor,
               y: torch.Tensor) -> _HeadGrads:
    """Each device's mean cross-entropy of ``LayerNorm(x; g, b) @ w.T`` against ``y``, with its
    gradients, the logits computed and used up in cache-sized chunks of devices.

    ``x`` [D, N, d] is the last block's output, ``g``/``b`` ln_f's scale and shift ([d],
    shared, or [D, d], each device's own), ``w`` the head ([V, d] or [D, V, d]) and ``y``
    [D, N] the targets. The loss is the mean over a device's N tokens of logsumexp(z) − z[y],
    so its gradient in the logits is (softmax(z) − onehot(y)) / N; the chain rule gives the
    gradients in h = n·g + b (that @ w), in ``w`` (its transpose @ h), in g (Σ ∂h·n), in b
    (Σ ∂h) and in ``x`` (LayerNorm's backward of ∂h·g). Computing them here means the logits of
    a whole group ([D·N, V]: 26 MiB for 100 phones) are never written to memory and read back
    (forward, softmax backward, nll backward), which was half a step. The LayerNorm and its
    backward run once over the whole group, not per chunk: per chunk, each op cost its Python
    and dispatch again and the input gradient a copy out (head 3 % faster). The affine h, the
    sums that give g's and b's gradients and the scaling of ∂h by g run per chunk, on rows still
    in cache; where the logits are bounded (``_logit_bound``) exp2 needs no max subtracted, and
    with a shared head the softmax's division is applied to ∂h's [k, N, d] chunk instead of the
    logits' [k, N, V] (head 56 → 53 ms on 100 phones, old and new alternating)."""
    D, N, d = x.shape
    V = w.shape[-2]
    own_w, own_g, own_b = w.dim() == 3, g.dim() == 2, b is not None and b.dim() == 2
    k = max(1, CHUNK_BYTES // (4 * N * V))
    head = torch.empty_like(w) if own_w else None
    ones = x.new_ones(d)
    n, mean, rstd = torch.native_layer_norm(x, (d,), ones, None, 1e-5)
    gq = g.expand(D, d).unsqueeze(1)  # [D, 1, d], as every chunk slices it
    gqn = gq / N
    bq = None if b is None else b.expand(D, d).unsqueeze(1)
    grad_h = torch.empty_like(n)  # N·∂h, then ∂n = ∂h·g
    scale, shift = (x.new_empty(D, d) if own_g else None), (x.new_empty(D, d) if own_b else None)
    total, zy = x.new_empty(D, N, 1), x.new_empty(D, N, 1)  # per token: Σ exp2(z − c), z[y] − c (c: max or 0)
    w2, minus_one = w * LOG2E, x.new_full((k, N, 1), -1.0)
    centre = _logit_bound(g, b, w2) >= EXP2_SAFE  # else exp2(z) is safe as it is: two passes fewer per chunk
    for i in range(0, D, k):
        c = slice(i, i + k)
        yc, nc, gh = y[c].unsqueeze(-1), n[c], grad_h[c]
        hc = nc * gq[c] if bq is None else torch.addcmul(bq[c], nc, gq[c])  # h = n·g + b
        wc, wc2 = (w[c], w2[c]) if own_w else (w, w2)
        z = hc @ wc2.transpose(-1, -2)  # [k, N, V], in base-2 units: log2(e)·logits
        if centre:  # z − max: then exp2 cannot overflow
            z.sub_(z.amax(-1, keepdim=True))
        torch.gather(z, -1, yc, out=zy[c])
        p = z.exp2_()  # exp2 is a third cheaper than exp here, and exp was the chunk's costliest pass
        torch.sum(p, -1, keepdim=True, out=total[c])
        if own_w:
            p.div_(total[c]).scatter_add_(-1, yc, minus_one[:len(yc)])  # N·∂logits
            torch.matmul(p, wc, out=gh)
            torch.matmul(p.transpose(-1, -2), hc, out=head[c])
        else:  # (p − total·onehot(y)) @ w / total: the division on [k, N, d], not [k, N, V]
            torch.matmul(p.scatter_add_(-1, yc, total[c].neg()), wc, out=gh)
            gh.div_(total[c])
        if scale is not None:
            torch.sum(gh * nc, 1, out=scale[c])
        if shift is not None:
            torch.sum(gh, 1, out=shift[c])
        gh.mul_(gqn[c])  # N·∂n, LayerNorm's backward turns into N·∂x
    losses = torch.mean(total.log_().sub_(zy, alpha=LN2), (1, 2))  # logsumexp − logit[y], in nats
    grad_x = torch.ops.aten.native_layer_norm_backward(
        grad_h, x, (d,), mean, rstd, ones, None, [True, False, False])[0]
    for grad in (head, scale, shift):
        if grad is not None:
            grad.div_(N)
    return _HeadGrads(losses, grad_x, scale, shift, head)


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
    inputs = None
    model.train()
    for i in range(steps):
        x, y = (t.to(device) for t in next_batches(batches))
        if i == 0:
            inputs = _Inputs.build(model, every, x.shape[-1], x.numel())
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step_offset + i)
        with autocast(device):
            h = _stacked_hidden(model, every, x, inputs)  # [devices, batch·seq, embd]
        w, g, b = every[head], every["ln_f.weight"], every.get("ln_f.bias")
        out = _head_loss(h.detach(), g.detach(), None if b is None else b.detach(), w.detach(), y.flatten(1))
        opt.zero_grad(set_to_none=True)
        # Gradients of tensors that train; the head's (when it trains) gains the embedding's if tied.
        for t, grad in ((w, out.head), (g, out.scale), (b, out.shift)):
            if grad is not None:
                t.grad = grad
        if h.requires_grad:  # not when only ln_f trains
            h.backward(out.x)
        if cfg.grad_clip > 0:
            _clip_per_device([p.grad for p in leaves], cfg.grad_clip)
        opt.step()
        losses[:, i] = out.losses.float().cpu()
        tokens += y[0].numel()
    return BatchedResult({k: v.detach() for k, v in stacked.items()}, losses, tokens)
