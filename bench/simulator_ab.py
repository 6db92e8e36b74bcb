"""Two versions of the simulator's batched training alternating on the phone workload in one
process: thread CPU time per group, the working tree's over a git revision's (issue 12).

On the shared 2-core machine ``bench/simulator.py``'s figures move with the load by more than
most changes to ``simulator/batched.py`` are worth (its one-thread floor fraction read 0.38 to
0.42 within minutes). Here groups of ``--group`` phones train under both versions, in turns
whose order flips each group, with the floor's 1024x1024 matmul probe after each pair, so both
versions meet the same load; thread CPU time leaves out the time this thread waits for a core.
The same code as both versions gave ratios of 0.990 to 1.000 (10 groups, load 4-5); two
different versions moved by up to 3 % between runs at that load, so a change of a few percent
needs runs in both orders before it counts.

Run: ``python bench/simulator_ab.py --old REV`` (REV: any git revision holding
``simulator/batched.py``). The JSON line gives ms of thread CPU per group for each version, the
ratio new/old, each version's floor fraction per CPU-second against the probe, and the largest
difference between the two versions' trained weights (float order only, when both are right).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from simulator import PROBE_FLOPS, matmul_probe  # bench/simulator.py's floor (bench/ is on sys.path when run)
from stamen.simulator import batched
from stamen.simulator.flower_baseline import Workload


def module_at(rev: str, directory: str) -> ModuleType | None:
    """``simulator/batched.py`` as it was at ``rev``, imported under its own name; None where
    git has no such file."""
    root = Path(batched.__file__).resolve().parents[1]
    shown = subprocess.run(["git", "-C", str(root), "show", f"{rev}:simulator/batched.py"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    source = shown.stdout
    path = Path(directory) / "batched_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("batched_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batched_old"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--groups", type=int, default=16, help="groups each version trains")
    ap.add_argument("--group", type=int, default=100, help="devices per group")
    args = ap.parse_args()
    if args.groups < 1 or args.group < 1:
        ap.error("--groups and --group must be at least 1")
    torch.set_num_threads(1)
    work = Workload(devices=args.group * (args.groups + 1))
    base = work.base_weights()
    work.shards()
    model = work.submodel(base)
    with tempfile.TemporaryDirectory() as tmp:
        old = module_at(args.old, tmp)
        if old is None:
            ap.error(f"--old {args.old}: git has no simulator/batched.py at that revision")
        versions = {"old": old, "new": batched}
        for module in versions.values():  # one untimed step each, as bench/simulator.py warms up
            module.train_batched(model, [work.batches(d) for d in range(args.group)], 1, work.train)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        cpu = {name: 0.0 for name in versions}
        probe, diff = 0.0, 0.0
        for g in range(args.groups):
            ids = range(args.group * (g + 1), args.group * (g + 2))
            trained = {}
            for name in (("old", "new") if g % 2 == 0 else ("new", "old")):
                start = time.thread_time()
                result = versions[name].train_batched(model, [work.batches(d) for d in ids], work.steps, work.train)
                result.deltas(base)
                cpu[name] += time.thread_time() - start
                trained[name] = result.weights
            start = time.thread_time()
            matmul_probe(a, b)
            probe += time.thread_time() - start
            diff = max(diff, max((trained["old"][n] - trained["new"][n]).abs().max().item() for n in trained["old"]))
    rate = PROBE_FLOPS * args.groups / probe
    flops = work.flops_per_update() * args.group * args.groups
    print(json.dumps({
        "old": args.old, "groups": args.groups, "group": args.group,
        **{f"{name}_ms_per_group": round(1e3 * s / args.groups, 1) for name, s in cpu.items()},
        "new_over_old": round(cpu["new"] / cpu["old"], 3),
        **{f"{name}_floor_fraction_cpu": round(flops / s / rate, 3) for name, s in cpu.items()},
        "probe_gflops": round(rate / 1e9, 1), "max_abs_weight_diff": diff,
    }))


if __name__ == "__main__":
    main()
