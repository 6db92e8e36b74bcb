"""A GPU node's training rate on CUDA: stamen's path (``core.train.train_steps``, bf16 autocast
over fp32 master weights) against the same loop in plain fp32, what a user gets without
autocast, and against the card's bf16 matmul rate measured in the same run (the floor).

Workload: the full plan of each ``--presets`` model (a GPU node trains the whole model), AdamW,
batches of ``--batch`` windows of the model's block size from the stdlib corpus. Each variant
trains ``--warmup`` untimed steps (kernel selection, the allocator, autocast's weight casts),
then ``--steps`` timed ones, ended by a device synchronize. ``mfu`` is the training FLOPs
(``Plan.cost``: 6N plus attention, per token) per second over the floor's rate: 8192-cube bf16
products, best of ten.

One JSON line per preset: ``{"preset", "batch", "seq_len", "bf16_tokens_per_s",
"fp32_tokens_per_s", "ratio", "floor_tflops", "mfu", "bf16_final_loss", "fp32_final_loss"}``.
Needs a CUDA device; without one it says so and exits 1. Run: ``python bench/gpu_node.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from unittest import mock

import torch

from stamen.core import train
from stamen.core.data import stdlib_corpus
from stamen.core.model import GPT, PRESETS
from stamen.core.plan import full_plan
from stamen.core.train import TrainConfig, train_steps


def bf16_matmul_flops_per_s(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best


def tokens_per_s(preset: str, batch: int, steps: int, warmup: int, bf16: bool) -> tuple[float, float]:
    """(tokens/s, final loss) of ``train_steps`` on CUDA; ``bf16=False`` turns autocast off, the
    only difference between the variants (same seed, weights, batches and optimizer)."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = GPT(cfg).to("cuda")
    tc = TrainConfig(lr=1e-3, warmup_steps=10, total_steps=warmup + steps)
    opt = train.make_optimizer(model, tc)
    stream = stdlib_corpus().split()[0].batches(batch, cfg.block_size, seed=0)
    with nullcontext() if bf16 else mock.patch.object(train, "autocast", lambda device: nullcontext()):
        train_steps(model, stream, warmup, tc, optimizer=opt)
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_steps(model, stream, steps, tc, optimizer=opt, step_offset=warmup)
        torch.cuda.synchronize()
    return steps * batch * cfg.block_size / (time.perf_counter() - start), result.final_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="gpt-small,gpt-125m,gpt-350m")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step, each the preset's block size")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_node.py needs a CUDA device; this machine has none", file=sys.stderr)
        sys.exit(1)
    floor = bf16_matmul_flops_per_s()
    for preset in args.presets.split(","):
        cfg = PRESETS[preset]
        bf16, bf16_loss = tokens_per_s(preset, args.batch, args.steps, args.warmup, bf16=True)
        fp32, fp32_loss = tokens_per_s(preset, args.batch, args.steps, args.warmup, bf16=False)
        flops_per_token = full_plan(cfg).cost(cfg, args.batch, cfg.block_size).flops_per_token
        print(json.dumps({"preset": preset, "batch": args.batch, "seq_len": cfg.block_size,
                          "bf16_tokens_per_s": round(bf16), "fp32_tokens_per_s": round(fp32),
                          "ratio": round(bf16 / fp32, 2), "floor_tflops": round(floor / 1e12, 1),
                          "mfu": round(bf16 * flops_per_token / floor, 3),
                          "bf16_final_loss": round(bf16_loss, 4), "fp32_final_loss": round(fp32_loss, 4)}),
              flush=True)


if __name__ == "__main__":
    main()
