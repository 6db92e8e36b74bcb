"""Poisoning in the simulator, defences on and off (issue 13, acceptance 2).

A small devices-only federation (gpt-tiny, ``--devices`` Jetsons, no GPU nodes: attackers are
devices, and a GPU node's token weight would drown them; one hardware class, on all day, so
that an attacker sends about its share of the updates, where a phone population in a short run
leaves the devices that happen to be online at the start doing all the work) runs the
server's packaged federation (FedBuff K = 4, Nesterov outer step) on the simulator's real
coordinator and aggregator for ``--versions`` versions, once clean and once per attack
kind (simulator/attackers.py) and attacker fraction, with the federation's default defences
("on": ``[defence]`` as packaged) and with none ("off": ``norm_bound = "off"``, ``rule =
"mean"``). Each attacked run is compared with the clean run of the same seed and defence.
One JSON line per case: {"attack", "fraction", "defence", "clean", "attacked", "harm"}, the
final validation losses (nats per byte) and harm = attacked / clean − 1, the mean over the
seeds. Then one line per defence setting with the clean runs' spread over the seeds (what
harm is measured against) and a last line with what the defaults cost a clean federation
(clean on / clean off − 1). Target: harm ≤ 0.02 at 10 % attackers for every kind with the
defaults (exit status 1 otherwise); "off" shows the harm they prevent.

Each run is shortened for two shared cores: sequences of 32 tokens, 8 inner steps and a short
warm-up (``BENCH_FEDERATION``); everything else is the packaged federation. bench/privacy.py
reuses this federation.

    .venv/bin/python bench/robustness.py [--devices 10] [--versions 12] [--seeds 1] [--kinds scaled,signflip]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from stamen.server.config import load_config
from stamen.simulator.attackers import KINDS, AttackConfig
from stamen.simulator.config import SimSetup, load_simulation
from stamen.simulator.engine import Simulation

BENCH_FEDERATION = "[training]\nseq_len = 32\nwarmup_steps = 10\n[tiers.jetson]\nsteps = 8\n"


def final_loss(setup: SimSetup, attack: AttackConfig, defence: str, seed: int) -> float:
    d = setup.fed.defence if defence == "on" else replace(setup.fed.defence, norm_bound="off", rule="mean")
    sim = replace(setup.sim, attack=attack, seed=seed, population=replace(setup.sim.population, seed=seed))
    loss = Simulation(sim, replace(setup.fed, defence=d), setup.classes).run().summary()["final_val_loss"]
    return loss if loss is not None and math.isfinite(loss) else math.inf


def bench_setup(devices: int, versions: int) -> SimSetup:
    setup = load_simulation()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "federation.toml"
        path.write_text(BENCH_FEDERATION)
        fed = load_config(path)
    sim = replace(setup.sim, max_versions=versions, eval_every=versions, eval_batches=4, baseline=False,
                  population=replace(setup.sim.population, devices=devices, mix={"jetson": 1.0}, gpu_nodes={}))
    return replace(setup, sim=sim, fed=fed)


def rounded(x: float) -> float | str:
    return round(x, 4) if math.isfinite(x) else "inf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--versions", type=int, default=12)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--fractions", default="0.1,0.2")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--defences", default="on,off")
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = bench_setup(args.devices, args.versions)
    seeds = range(args.seed, args.seed + args.seeds)
    failed, cleans = False, {}
    for defence in args.defences.split(","):
        clean = cleans[defence] = [final_loss(setup, AttackConfig(), defence, s) for s in seeds]
        for kind in args.kinds.split(","):
            for fraction in map(float, args.fractions.split(",")):
                attacked = [final_loss(setup, AttackConfig(fraction, kind), defence, s) for s in seeds]
                harm = statistics.mean(a / c - 1 for a, c in zip(attacked, clean))
                print(json.dumps({"attack": kind, "fraction": fraction, "defence": defence,
                                  "clean": rounded(statistics.mean(clean)), "attacked": rounded(statistics.mean(attacked)),
                                  "harm": rounded(harm)}), flush=True)
                failed |= defence == "on" and fraction <= 0.1 and not harm <= 0.02
    for defence, clean in cleans.items():
        print(json.dumps({"defence": defence, "clean_per_seed": [rounded(c) for c in clean],
                          "clean_spread": rounded(max(clean) / min(clean) - 1)}), flush=True)
    if {"on", "off"} <= set(cleans):
        cost = statistics.mean(a / b - 1 for a, b in zip(cleans["on"], cleans["off"]))
        print(json.dumps({"defence_cost_on_clean": rounded(cost)}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
