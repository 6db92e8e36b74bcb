"""Aggregator throughput and memory (issue 3, acceptance 5).

For each (model, plan), in a fresh process, the aggregator takes a stream of updates of that
plan (``submit``: admission checks + accumulation into the buffer; the buffer is sized so no
flush falls inside the timed stream) and then one flush (Nesterov). The floor, measured in the
same process on the same delta bytes, is one ``acc.add_(delta, alpha=w)`` pass per tensor per
update into a buffer shaped like the deltas. The two are timed in alternating rounds of the
same updates and each keeps its fastest round, so load from other processes hits both alike.
One JSON line per case:

  model, plan, updates_per_s, floor_updates_per_s, ratio (target >= 0.5), flush_s,
  peak_rss_mb: the process's peak during the rounds and the flush (the high-water mark is reset
    after setup, so building the initial model does not count),
  setup_rss_mb: RSS when the high-water mark was reset (all of the above allocated; what malloc
    kept from building the initial model is trimmed first); growth_mb = peak − setup: what the
    rounds and the flush added (expected: the new version, new_version_mb),
  budget_mb: base_rss_mb (the process before the case: torch and its kernels, warmed up on
    gpt-tiny) + model + outer optimizer
    state + one buffer + the updates in flight + the floor's own accumulator + the new version
    the flush publishes while τ_max = 1 keeps the old one.

Run: ``python bench/aggregator.py`` (~2 minutes on two shared CPU cores; gpt-125m needs ~4 GB).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from stamen.core.model import GPT, ModelSpec, weights
from stamen.core.plan import tier_plans
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig

IN_FLIGHT = 2  # distinct deltas held at once (re-sent under fresh task ids)
MB = 2**20


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Set the RSS high-water mark to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _warm_up() -> None:
    """Run the same code paths once on gpt-tiny, so torch's kernels (file-backed pages that RSS
    counts) are loaded before the base is read and the budget compares data with data."""
    cfg = ModelSpec("gpt-tiny").gpt_config()
    agg = Aggregator(cfg, weights(GPT(cfg)), AggregatorConfig(buffer_k=1, tau_max=1))
    plan = tier_plans(cfg)["laptop"]
    shapes = plan.shapes(cfg)
    delta = {n: torch.zeros(shapes[n]) for n in plan.trainable(cfg)}
    agg.submit(Update("warm", 0, plan, delta, 1), now=0.0)
    for d in delta.values():
        d.add_(d, alpha=1.0)
    del agg
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(model: str, tier: str, updates: int, rounds: int, seed: int) -> dict:
    torch.set_num_threads(1)  # both sides single-threaded: the ratio, not the cores, is the figure
    torch.manual_seed(seed)
    _warm_up()
    base_rss = _status_mb("VmRSS")
    cfg = ModelSpec(model).gpt_config()
    agg = Aggregator(cfg, weights(GPT(cfg)), AggregatorConfig(buffer_k=rounds * updates + 2, tau_max=1))
    plan = tier_plans(cfg)[tier]
    shapes = plan.shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    deltas = [{n: torch.randn(shapes[n], generator=gen) * 1e-3 for n in plan.trainable(cfg)} for _ in range(IN_FLIGHT)]
    stream = [[Update(f"r{r}u{i}", 0, plan, deltas[i % IN_FLIGHT], 1000 + i) for i in range(updates)]
              for r in range(rounds)]
    acc = {n: torch.zeros(shapes[n]) for n in deltas[0]}
    agg.submit(Update("warm", 0, plan, deltas[0], 1), now=0.0)  # caches the plan layout (K leaves room)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what building the throwaway GPT left in malloc's pools
    _reset_peak()
    setup_rss = _status_mb("VmRSS")

    agg_s = floor_s = float("inf")
    for chunk in stream:
        t = time.perf_counter()
        for u in chunk:
            agg.submit(u, now=0.0)
        agg_s = min(agg_s, time.perf_counter() - t)
        t = time.perf_counter()
        for u in chunk:
            for n, d in u.delta.items():
                acc[n].add_(d, alpha=float(u.tokens))
        floor_s = min(floor_s, time.perf_counter() - t)

    t = time.perf_counter()
    agg.flush("k")
    flush_s = time.perf_counter() - t
    peak = _status_mb("VmHWM")

    model_b, state_b, delta_b = _nbytes(agg.weights), _nbytes(agg.opt_state), _nbytes(deltas[0])
    budget_b = model_b + state_b + model_b + IN_FLIGHT * delta_b + delta_b + model_b
    return {"model": model, "plan": tier, "updates_per_s": round(updates / agg_s, 2),
            "floor_updates_per_s": round(updates / floor_s, 2), "ratio": round(floor_s / agg_s, 3),
            "flush_s": round(flush_s, 3), "peak_rss_mb": round(peak, 1), "base_rss_mb": round(base_rss, 1),
            "setup_rss_mb": round(setup_rss, 1), "growth_mb": round(peak - setup_rss, 1),
            "new_version_mb": round(model_b / MB, 1),
            "budget_mb": round(base_rss + budget_b / MB, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt-small", "gpt-125m"])
    ap.add_argument("--plans", nargs="+", default=["gpu", "laptop", "phone-low"])
    ap.add_argument("--updates", type=int, default=8, help="updates per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for model in args.models:
        for tier in args.plans:
            # a fresh process per case: ru_maxrss is a high-water mark
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                print(json.dumps(pool.submit(measure, model, tier, args.updates, args.rounds, args.seed).result()), flush=True)


if __name__ == "__main__":
    main()
