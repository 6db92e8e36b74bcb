"""What central differential privacy costs (issue 13, acceptance 3).

The federation of bench/robustness.py (gpt-tiny, ``--devices`` Jetsons, no GPU nodes, on the
real coordinator and aggregator) runs for ``--versions`` versions without DP, then with
DP-FedBuff (``[privacy]``: every update clipped to ``--clip`` and weighted 1, Gaussian noise
of noise_multiplier x clip per flush) at each ``--sigmas`` value, the same seed. Every run uses
``rule = "mean"`` (DP needs it) and K = ``--buffer-k``. One JSON line per run:
{"dp", "noise_multiplier", "clip", "buffer_k", "epsilon", "delta", "flushes", "final_loss",
"cost"}, epsilon as the simulation summary reports it (Opacus's RDP accountant, every device
in every flush) and cost = final_loss / final_loss without DP − 1.

    .venv/bin/python bench/privacy.py [--sigmas 0.01,0.1,1.0] [--clip 2.0] [--buffer-k 8]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from robustness import bench_setup  # the same small federation (bench/ is on sys.path when run)
from stamen.server.aggregator import AggregatorConfig
from stamen.server.privacy import PrivacyConfig
from stamen.simulator.engine import Simulation


def run(setup, privacy: PrivacyConfig) -> dict:
    fed = replace(setup.fed, privacy=privacy, defence=replace(setup.fed.defence, rule="mean"))
    AggregatorConfig(privacy=privacy, defence=fed.defence)  # the settings' own checks, before the run
    return Simulation(setup.sim, fed, setup.classes).run().summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--versions", type=int, default=12)
    p.add_argument("--buffer-k", type=int, default=8)
    p.add_argument("--clip", type=float, default=2.0)
    p.add_argument("--sigmas", default="0.01,0.1,1.0")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = bench_setup(args.devices, args.versions)
    sim = replace(setup.sim, seed=args.seed, population=replace(setup.sim.population, seed=args.seed))
    fed = replace(setup.fed, aggregation=replace(setup.fed.aggregation, buffer_k=args.buffer_k))
    setup = replace(setup, sim=sim, fed=fed)
    base = run(setup, PrivacyConfig())["final_val_loss"]
    print(json.dumps({"dp": False, "noise_multiplier": None, "clip": None, "buffer_k": args.buffer_k, "epsilon": None,
                      "delta": None, "flushes": None, "final_loss": round(base, 4), "cost": 0.0}), flush=True)
    for sigma in map(float, args.sigmas.split(",")):
        s = run(setup, PrivacyConfig(enabled=True, clip=args.clip, noise_multiplier=sigma, delta=args.delta,
                                     seed=args.seed))
        pr, loss = s["privacy"], s["final_val_loss"]
        print(json.dumps({"dp": True, "noise_multiplier": sigma, "clip": args.clip, "buffer_k": args.buffer_k,
                          "epsilon": round(pr["epsilon"], 3), "delta": pr["delta"], "flushes": pr["flushes"],
                          "final_loss": round(loss, 4), "cost": round(loss / base - 1, 4)}), flush=True)


if __name__ == "__main__":
    main()
