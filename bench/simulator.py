"""Device-updates per wall-second of the simulator's batched local training, against Flower's
simulation engine doing the same training and against the arithmetic floor (issues 7 and 12).

Workload: gpt-tiny, the phone-low tier plan, 4 local steps of batch 4 x 64 tokens per device,
1,000 devices on the stdlib corpus (natural partition). All three figures come from this run,
on this machine:
- stamen: ``simulator.batched.train_batched`` over all devices, ``--group`` devices at a time;
- Flower: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per client) with one node per
  device, training the same devices with ``core.train.train_steps``, timed after a warm-up
  round; the deltas it returns are checked against stamen's. All 1,000 nodes by default:
  Flower's rate falls as nodes grow (measured here: ~50 updates/s with 100 nodes, ~30 with
  1,000), so a smaller ``--flower-devices`` flatters it;
- floor: the workload's training FLOPs (``Plan.cost``) at the fp32 matmul rate of this process
  (same threads), measured by a 1024x1024 matmul probe after every group (two products of
  matrices drawn once, outside the clock), so the floor and the training run under the same
  load. ``floor_fraction`` is per wall-second; ``floor_fraction_cpu``
  is the same ratio per CPU-second of this process, the steadier figure on a shared machine.
  ``matmul_gflops_best`` is the best single matmul, for reference.
stamen runs on ``--threads`` (default one) while Flower's Ray actors take every core, so the
ratio is conservative. The first line also gives stamen on every core against the every-core
floor, a long-task workload (``--long-steps`` local steps, default 64: devices that train for
minutes, as long simulations need) and a Python loop over devices (``train_steps`` one by one),
the in-process baseline.

Why a ratio of 50 cannot be met here: Flower's actors spend most of each task training (one
device's 4 steps take ~12 ms, so its overhead is not what bounds it), and 50x Flower's ~30
updates/s would be ~230 GFLOP/s of training, more than the fp32 matmul rate of both cores
together (~190 GFLOP/s).

Run: ``python bench/simulator.py``. The last line is the JSON of the issue.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import dataclass, replace

import torch

from stamen.core.train import train_steps
from stamen.simulator.batched import train_batched
from stamen.simulator.flower_baseline import Workload, run_flower


def matmul_flops_per_s(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 matmul rate of this process (its current thread count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@dataclass
class Clock:
    """Wall and CPU seconds spent on one kind of work, and the FLOPs it did."""

    wall: float = 0.0
    cpu: float = 0.0
    flops: float = 0.0

    def time(self, fn, flops: float):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.flops += flops
        return out


PROBE_FLOPS = 2 * 2 * 1024**3  # one matmul_probe: two products of 1024x1024 matrices


def matmul_probe(a: torch.Tensor, b: torch.Tensor, count: int = 2) -> None:
    """``count`` products of the probe's matrices: only the matmuls are timed (drawing two
    fresh 1024x1024 random matrices inside the clock cost a fifth of the probe's time and
    understated the floor by as much)."""
    for _ in range(count):
        a @ b


def updates(model: torch.nn.Module, work: Workload, base: dict, ids: range) -> dict[int, dict]:
    """Devices ``ids`` trained together, each one's Δ = θ_base − θ_local: an update is timed
    until its delta exists, as Flower's ClientApp computes its delta before replying."""
    result = train_batched(model, [work.batches(d) for d in ids], work.steps, work.train)
    return dict(zip(ids, result.deltas(base)))


def stamen_rate(work: Workload, base: dict, group: int) -> dict:
    """Train every device, ``group`` at a time, with a matmul probe after each group: the floor
    is the probes' sustained rate, so training and floor are measured under the same load (on a
    shared machine a best-of-N matmul catches an idle moment that the training never gets).
    The first group trains one step untimed first, as Flower is timed after a warm-up round: a
    simulation trains group after group in one process, and the first one alone pays for the
    memory the kernel hands this thread's heap (~180 MiB of page faults for 100 phones)."""
    model = work.submodel(base)
    train_batched(model, [work.batches(d) for d in range(min(group, work.devices))], 1, work.train)
    train, floor = Clock(), Clock()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    deltas = {}
    for first in range(0, work.devices, group):
        ids = range(first, min(first + group, work.devices))
        deltas.update(train.time(lambda: updates(model, work, base, ids), len(ids) * work.flops_per_update()))
        floor.time(lambda: matmul_probe(a, b), PROBE_FLOPS)
    return {"updates_per_s": work.devices / train.wall,
            "floor_updates_per_s": floor.flops / floor.wall / work.flops_per_update(),
            "floor_fraction": train.flops * floor.wall / (train.wall * floor.flops),
            "floor_fraction_cpu": train.flops * floor.cpu / (train.cpu * floor.flops),
            "deltas": deltas}


def figures(r: dict) -> dict:
    """A stamen_rate result, rounded, without the deltas."""
    return {k: round(v, 3 if "fraction" in k else 1) for k, v in r.items() if k != "deltas"}


def loop_rate(work: Workload, base: dict, n: int) -> float:
    model = work.submodel(base)
    start = time.perf_counter()
    for d in range(n):
        train_steps(copy.deepcopy(model), work.batches(d), work.steps, work.train)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--group", type=int, default=100, help="devices trained together in one batched step")
    ap.add_argument("--flower-devices", type=int, default=None, help="nodes Flower runs (default: --devices)")
    ap.add_argument("--loop-devices", type=int, default=50)
    ap.add_argument("--long-steps", type=int, default=64, help="local steps of the long-task workload")
    ap.add_argument("--long-devices", type=int, default=100, help="devices of the long-task workload")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in this process (Flower's actors get one each); on a shared "
                         "machine one thread avoids OpenMP spinning on a core someone else holds")
    args = ap.parse_args()

    work = Workload(devices=args.devices)
    long = replace(work, devices=args.long_devices, steps=args.long_steps)
    base = work.base_weights()
    work.shards(), long.shards()  # load the corpus before any clock starts
    torch.set_num_threads(os.cpu_count())
    stamen_all = stamen_rate(work, base, args.group)
    torch.set_num_threads(args.threads)
    matmul = matmul_flops_per_s()
    stamen = stamen_rate(work, base, args.group)
    long_rate = stamen_rate(long, base, args.group)
    loop = loop_rate(work, base, args.loop_devices)
    flower_ids = list(range(args.flower_devices or args.devices))
    flower, flower_deltas = run_flower(work, flower_ids, warmup=min(8, len(flower_ids)))
    deltas = stamen["deltas"]
    diff = max((deltas[d][n] - fd[n]).abs().max().item() for d, fd in zip(flower_ids, flower_deltas) for n in fd)
    print(json.dumps({
        "workload": f"{work.model} {work.tier} plan, {work.steps} steps x {work.batch_size}x{work.seq_len} tokens",
        "group": args.group, "threads": args.threads, "flower_devices_timed": len(flower_ids),
        "loop_updates_per_s": round(loop, 1), "batched_vs_loop": round(stamen["updates_per_s"] / loop, 1),
        "matmul_gflops_best": round(matmul / 1e9, 1), "mflops_per_update": round(work.flops_per_update() / 1e6, 1),
        "floor_fraction_cpu": round(stamen["floor_fraction_cpu"], 3),
        "all_cores": {"threads": os.cpu_count(), **figures(stamen_all)},
        "long_task": {"devices": long.devices, "steps": long.steps, **figures(long_rate)},
        "max_abs_delta_diff_vs_flower": diff,
    }))
    print(json.dumps({"clients": args.devices, "stamen_updates_per_s": round(stamen["updates_per_s"], 1),
                      "flower_updates_per_s": round(flower, 1), "ratio": round(stamen["updates_per_s"] / flower, 2),
                      "floor_updates_per_s": round(stamen["floor_updates_per_s"], 1),
                      "floor_fraction": round(stamen["floor_fraction"], 3)}))


if __name__ == "__main__":
    main()
