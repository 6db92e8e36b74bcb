"""Do devices make the model better than the GPU nodes alone (issue 11, acceptance 1-4)?

For each scenario, the packaged default simulation (1,000 devices + 2 GPU nodes) runs as three
variants of one population and seed, stopped at the same virtual time, and centralized
training runs on all the training text at the mixed run's tokens and at the devices-alone
run's (far fewer) tokens (``simulator.compare``):
- ``private``: GPU nodes read the public half of the packages, devices split the rest;
- ``shared``: GPU nodes read all the training text and devices split it too.
In the private scenario a fourth variant, ``gpu_only_pooled``, is the GPU nodes alone reading the
devices' text too: the most that text could give the nodes' own steps (``pooled_over_gpu_only``
on private text is the bound for acceptance 2's ``mixed_over_gpu_only`` there).
One JSON line per scenario, seed and validation domain (final validation losses, nats/byte):
``{"scenario", "seed", "virtual_h", "domain", "mixed", "gpu_only", "devices_only",
["gpu_only_pooled",] "centralized_equal_tokens", "centralized_devices_tokens"}``, and a last line
with the medians over the seeds and the acceptance ratios (``devices_only_over_centralized``
against the mixed run's tokens, ``devices_only_over_centralized_devices_tokens`` against the
devices' own). All figures come from this run; wall time does not enter them.

Run: ``python bench/federation.py`` (``--versions N`` shortens every run to the mixed run's
first N versions; ``--seeds`` defaults to 3; ``--scenario private`` runs one scenario).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from stamen.simulator.compare import VARIANTS, compare
from stamen.simulator.config import load_simulation

SCENARIOS = ("private", "shared")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--scenario", choices=SCENARIOS, action="append", help="only this scenario (repeatable)")
    p.add_argument("--versions", type=int, help="the mixed run's version cap (default: the config's)")
    p.add_argument("--config", help="a simulation TOML instead of the packaged default")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    scenarios = tuple(args.scenario or SCENARIOS)
    for scenario in scenarios:
        setup = load_simulation(args.config)
        sim = replace(setup.sim, text=scenario, baseline=False, seed=args.seed,
                      population=replace(setup.sim.population, seed=args.seed))
        if args.versions:
            sim = replace(sim, max_versions=args.versions)
        names = VARIANTS if scenario == "private" else tuple(v for v in VARIANTS if v != "gpu-only-pooled")
        with tempfile.TemporaryDirectory() as out:
            result = compare(replace(setup, sim=sim), names, Path(out), seeds=args.seeds)
        for r in result["seeds"]:
            for d in result["domains"]:
                row = {"scenario": scenario, "seed": r["seed"], "virtual_h": round(r["virtual_h"], 6), "domain": d}
                row |= {v.replace("-", "_"): round(r["final"][v][d], 4) for v in names}
                row["centralized_equal_tokens"] = round(r["centralized_equal_tokens"]["final"][d], 4)
                row["centralized_devices_tokens"] = round(r["centralized_devices_tokens"]["final"][d], 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
    medians = {}
    for scenario in scenarios:
        for d in sorted({r["domain"] for r in rows if r["scenario"] == scenario}):
            mine = [r for r in rows if r["scenario"] == scenario and r["domain"] == d]
            keys = [k for k in mine[0] if k not in ("scenario", "seed", "virtual_h", "domain")]
            medians[f"{scenario}/{d}"] = {k: statistics.median(r[k] for r in mine) for k in keys}
    ratios = {f"{name}/mixed_over_gpu_only": m["mixed"] / m["gpu_only"] for name, m in medians.items()}
    ratios |= {f"{name}/pooled_over_gpu_only": m["gpu_only_pooled"] / m["gpu_only"]
               for name, m in medians.items() if "gpu_only_pooled" in m}
    ratios |= {f"{name}/{v}_over_centralized": m[v] / m["centralized_equal_tokens"]
               for name, m in medians.items() if name.endswith("/all") for v in ("mixed", "devices_only")}
    ratios |= {f"{name}/devices_only_over_centralized_devices_tokens": m["devices_only"] / m["centralized_devices_tokens"]
               for name, m in medians.items() if name.endswith("/all")}
    print(json.dumps({"medians": medians, "ratios": {k: round(v, 4) for k, v in ratios.items()},
                      "seeds": args.seeds}))


if __name__ == "__main__":
    main()
