"""Exported runtimes against eager torch, same plan, weights and batches, in one run.

Prints one JSON line per (model, plan, runtime):
{"model", "plan", "runtime", "ms_per_step", "eager_ms_per_step", "ratio", "peak_rss_mb"}.
Every runtime gets the same number of CPU threads (``--threads``, default 1: on a shared
machine more threads than free cores make every runtime wait on spinning workers). Every
measurement runs in its own fresh process, so ``peak_rss_mb`` is that runtime's own
peak (model, program, activations and the Python/torch baseline every process carries);
eager is measured the same way in the same run, and ``ratio`` = ms_per_step / eager.

    python bench/runtimes.py [--steps 20] [--batch 8] [--seq 64] [--models gpt-tiny,gpt-small]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time

import torch

from stamen.core.model import PRESETS, ModelSpec, load_weights
from stamen.core.plan import tier_plans
from stamen.core.train import TrainConfig, train_steps

PLANS = {"gpt-tiny": ("phone-high", "gpu"), "gpt-small": ("phone-high", "laptop")}
RUNTIMES = ("ort", "executorch", "executorch+xnnpack")
WARMUP = 3
CFG = TrainConfig(optimizer="sgd", lr=1e-2, schedule="constant")


def batches(n: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randint(32, 128, (n, batch, seq + 1), generator=g)
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in w]


def measure(model_name: str, plan_name: str, runtime: str, steps: int, batch: int, seq: int,
            cache: str, threads: int) -> tuple[float, float]:
    """(ms per step, peak RSS in MB) of one runtime, in the calling (fresh) process."""
    torch.set_num_threads(threads)
    cfg = PRESETS[model_name]
    plan = tier_plans(cfg)[plan_name]
    torch.manual_seed(0)
    sub = plan.extract({n: p.detach() for n, p in ModelSpec(model_name).build().named_parameters()}, cfg)
    data = batches(WARMUP + steps, batch, seq)
    if runtime == "eager":
        model = plan.build(cfg)
        load_weights(model, sub)
        run = lambda bs, n: train_steps(model, iter(bs), n, CFG)  # noqa: E731
    else:
        from stamen.edge_client.executorch_runtime import ExecuTorchRuntime
        from stamen.edge_client.ort_runtime import OrtRuntime
        from stamen.mobile_bridge.bundle import cached_bundle

        name, _, delegate = runtime.partition("+")
        folder = cached_bundle(ModelSpec(model_name), plan, name, batch, seq, cache, xnnpack=delegate == "xnnpack")
        rt = (OrtRuntime if name == "ort" else ExecuTorchRuntime)(folder, threads=threads)
        rt.set_weights(sub)
        run = lambda bs, n: rt.train(iter(bs), n, CFG)  # noqa: E731
    run(data[:WARMUP], WARMUP)
    t0 = time.perf_counter()
    run(data[WARMUP:], steps)
    ms = (time.perf_counter() - t0) / steps * 1000
    return ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(*args) -> tuple[float, float]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--models", default="gpt-tiny,gpt-small")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads every runtime may use (same for all)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for model_name in args.models.split(","):
            for plan_name in PLANS[model_name]:
                common = (args.steps, args.batch, args.seq, cache, args.threads)
                for rt in args.runtimes.split(","):  # export (and cache) outside the timing
                    if rt != "eager":
                        in_fresh_process(model_name, plan_name, rt, 1, *common[1:])
                eager_ms, _ = in_fresh_process(model_name, plan_name, "eager", *common)
                for rt in args.runtimes.split(","):
                    ms, rss = in_fresh_process(model_name, plan_name, rt, *common)
                    print(json.dumps({"model": model_name, "plan": plan_name, "runtime": rt,
                                      "ms_per_step": round(ms, 2), "eager_ms_per_step": round(eager_ms, 2),
                                      "ratio": round(ms / eager_ms, 2), "peak_rss_mb": round(rss, 1)}), flush=True)


if __name__ == "__main__":
    main()
