"""Aggregator throughput and memory (issue 3, acceptance 5).

For each (model, plan), in a fresh process so peak RSS is its own, the aggregator takes a
stream of updates of that plan (``submit``: admission checks + accumulation into the buffer;
the buffer is sized so no flush falls inside the timed stream) and then one flush (Nesterov).
The floor, measured in the same process on the same delta bytes, is one
``acc.add_(delta, alpha=w)`` pass per update into a buffer shaped like the deltas. One JSON line
per case:

  model, plan, updates_per_s, floor_updates_per_s, ratio (target >= 0.5), flush_s,
  peak_rss_mb, base_rss_mb (the process before the case: torch itself), budget_mb = model + outer optimizer state + one buffer + the updates in flight
  + the one older version τ_max = 1 keeps after the flush.

Run: ``python bench/aggregator.py`` (~2 minutes on two shared CPU cores; gpt-125m needs ~3 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from stamen.core.model import GPT, ModelSpec, weights
from stamen.core.plan import tier_plans
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig

IN_FLIGHT = 2  # distinct deltas held at once (re-sent under fresh task ids)


def measure(model: str, tier: str, updates: int, seed: int) -> dict:
    torch.set_num_threads(1)  # both sides single-threaded: the ratio, not the cores, is the figure
    torch.manual_seed(seed)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch and the interpreter
    cfg = ModelSpec(model).gpt_config()
    agg = Aggregator(cfg, weights(GPT(cfg)), AggregatorConfig(buffer_k=updates + 2, tau_max=1))
    plan = tier_plans(cfg)[tier]
    shapes = plan.shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    deltas = [{n: torch.randn(shapes[n], generator=gen) * 1e-3 for n in plan.trainable(cfg)} for _ in range(IN_FLIGHT)]
    stream = [Update(f"u{i}", 0, plan, deltas[i % IN_FLIGHT], 1000 + i) for i in range(updates)]
    agg.submit(Update("warm", 0, plan, deltas[0], 1), now=0.0)  # caches the plan layout (K leaves room)

    t = time.perf_counter()
    for u in stream:
        agg.submit(u, now=0.0)
    agg_s = time.perf_counter() - t

    acc = {n: torch.zeros(shapes[n]) for n in deltas[0]}
    t = time.perf_counter()
    for u in stream:
        for n, d in u.delta.items():
            acc[n].add_(d, alpha=float(u.tokens))
    floor_s = time.perf_counter() - t

    t = time.perf_counter()
    agg.flush("k")
    flush_s = time.perf_counter() - t

    mb = 2**20
    model_b = sum(w.numel() * w.element_size() for w in agg.weights.values())
    state_b = sum(s.numel() * s.element_size() for s in agg.opt_state.values())
    delta_b = sum(d.numel() * d.element_size() for d in deltas[0].values())
    return {"model": model, "plan": tier, "updates_per_s": round(updates / agg_s, 2),
            "floor_updates_per_s": round(updates / floor_s, 2), "ratio": round(floor_s / agg_s, 3),
            "flush_s": round(flush_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "base_rss_mb": round(base_rss, 1), "budget_mb": round((3 * model_b + state_b + IN_FLIGHT * delta_b) / mb, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt-small", "gpt-125m"])
    ap.add_argument("--plans", nargs="+", default=["gpu", "laptop", "phone-low"])
    ap.add_argument("--updates", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for model in args.models:
        for tier in args.plans:
            # a fresh process per case: ru_maxrss is a high-water mark
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                print(json.dumps(pool.submit(measure, model, tier, args.updates, args.seed).result()), flush=True)


if __name__ == "__main__":
    main()
