"""Poisoning in the simulator, defences on and off (issue 13, acceptance 2).

For each attack kind (simulator/attackers.py) and attacker fraction, the same seeded population
runs with the federation's default defences ("on": norm bound clip, mean) and with them off
(``norm_bound = "off"``), each against a clean run (no attackers) of the same defence setting.
One JSON line per run: {"attack", "fraction", "defence", "clean", "attacked", "harm"} with
clean/attacked the final validation loss and harm = attacked / clean − 1. Target: harm ≤ 0.02
at 10 % attackers for every kind with the defences on; "off" shows what they prevent.

    .venv/bin/python bench/robustness.py [--devices 60] [--versions 12] [--kinds scaled,signflip]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace

from stamen.simulator.attackers import KINDS, AttackConfig
from stamen.simulator.config import load_simulation
from stamen.simulator.engine import Simulation


def final_loss(setup, attack: AttackConfig, defence: str) -> float:
    d = setup.fed.defence if defence == "on" else replace(setup.fed.defence, norm_bound="off")
    sim = replace(setup.sim, attack=attack)
    loss = Simulation(sim, replace(setup.fed, defence=d), setup.classes).run().summary()["final_val_loss"]
    return loss if math.isfinite(loss) else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=60)
    p.add_argument("--versions", type=int, default=12)
    p.add_argument("--fractions", default="0.1,0.2")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--defences", default="on,off")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    setup = load_simulation()
    sim = replace(setup.sim, max_versions=args.versions, eval_every=args.versions, baseline=False, seed=args.seed,
                  population=replace(setup.sim.population, devices=args.devices, seed=args.seed))
    setup = replace(setup, sim=sim)
    failed = False
    for defence in args.defences.split(","):
        clean = final_loss(setup, AttackConfig(), defence)
        for kind in args.kinds.split(","):
            for fraction in map(float, args.fractions.split(",")):
                attacked = final_loss(setup, AttackConfig(fraction, kind), defence)
                harm = attacked / clean - 1
                print(json.dumps({"attack": kind, "fraction": fraction, "defence": defence, "clean": round(clean, 4),
                                  "attacked": round(attacked, 4) if math.isfinite(attacked) else "inf",
                                  "harm": round(harm, 4) if math.isfinite(harm) else "inf"}), flush=True)
                failed |= defence == "on" and fraction <= 0.1 and not harm <= 0.02
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
