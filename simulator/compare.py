"""Synchronous rounds against asynchronous buffering on the same population (FedBuff's
question): how many virtual hours each needs to reach the same validation loss.

Synchronous FedAvg/DiLoCo is the same coordinator under the scheduler's rounds policy
(``[aggregation] mode = "rounds"``, which ``stamen server`` runs too): every GPU node once plus
``K`` devices a round (``buffer_k = K + nodes``), nothing stale accepted (``tau_max = 0``), and
no more than ``[scheduler] overselect`` x K device tasks issued per version (130 %, as
production synchronous FL does). A round closes at its first ``buffer_k`` arrivals and refuses
the late ones; when dropouts leave it short, it closes with what it has once its first update
has waited a task deadline (``max_wait_s``) — the straggler cost that asynchronous buffering
avoids.

The target comes from the async run as configured (90% of the way from the initial loss to its
final one: the last evaluations are the noisiest, and one of them should not decide the
result). The synchronous run then goes on, under the same virtual-time horizon and a version
cap ``SYNC_VERSIONS`` times the async one, until it reaches the target or runs out.

One population can hinge on a single straggler, so the comparison repeats over several seeds
(population, data and events all change) and reports each and the median speed-up.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from stamen.server.config import FederationConfig
from stamen.simulator.config import SimSetup
from stamen.simulator.engine import Simulation
from stamen.simulator.report import plot_sync_vs_async

TARGET_FRACTION = 0.9  # of the async run's loss drop that both runs must reach
SYNC_VERSIONS = 4  # the sync run's version cap, as a multiple of the async run's


def synchronous(fed: FederationConfig, cohort: int, gpu_nodes: int = 0) -> FederationConfig:
    """``fed`` run as synchronous rounds of ``cohort`` devices plus every GPU node, each round
    closing at the task deadline with whatever arrived."""
    a = replace(fed.aggregation, mode="rounds", buffer_k=cohort + gpu_nodes, tau_max=0,
                max_wait_s=fed.scheduler.task_deadline_s, min_quorum=1)
    return replace(fed, aggregation=a)


def hours_to_loss(evals: list[dict], target: float) -> float | None:
    """The virtual time of the first evaluation at or below ``target`` (None if never)."""
    return next((e["time_h"] for e in evals if e["val_loss"] <= target), None)


def target_loss(evals: list[dict]) -> float:
    """``TARGET_FRACTION`` of the way from the first evaluation's loss to the last's."""
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    return first - TARGET_FRACTION * (first - last)


def compare_once(setup: SimSetup) -> dict:
    """One population: the async run as configured, then synchronous rounds of ``buffer_k``
    devices until they reach the async run's target."""
    # Both evaluate every version: at the configured spacing a run's time to target would be
    # rounded up to its next evaluation, by up to several rounds for the synchronous run.
    asyn = Simulation(replace(setup.sim, eval_every=1), setup.fed, setup.classes)
    runs = {"async": asyn.run().summary()}
    target = target_loss(runs["async"]["evals"])
    sync = synchronous(setup.fed, setup.fed.aggregation.buffer_k, asyn.gpu_nodes)
    sim = replace(setup.sim, eval_every=1, max_versions=SYNC_VERSIONS * max(1, runs["async"]["versions"]))
    runs["sync"] = Simulation(sim, sync, setup.classes).run(target_loss=target).summary()
    hours = {name: hours_to_loss(r["evals"], target) for name, r in runs.items()}
    return {"seed": setup.sim.seed, "target_val_loss": target, "hours_to_target": hours,
            "async_speedup": hours["sync"] / hours["async"] if hours["sync"] and hours["async"] else None,
            "runs": {name: {k: r[k] for k in ("versions", "end_time_h", "counters", "per_tier", "mean_staleness",
                                              "evals", "flushes")}
                     for name, r in runs.items()}}


def sync_vs_async(setup: SimSetup, out: Path, seeds: int = 3) -> dict:
    """``compare_once`` for seeds ``setup.sim.seed`` onwards; the JSON holds every seed's runs
    and the median speed-up, the plot the first seed's curves."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in range(setup.sim.seed, setup.sim.seed + seeds):
        sim = replace(setup.sim, seed=seed, population=replace(setup.sim.population, seed=seed))
        per_seed.append(compare_once(replace(setup, sim=sim)))
    speedups = [r["async_speedup"] for r in per_seed if r["async_speedup"] is not None]
    result = {"target_fraction": TARGET_FRACTION, "overselect": setup.fed.scheduler.overselect,
              "median_async_speedup": statistics.median(speedups) if speedups else None,
              "async_speedups": [r["async_speedup"] for r in per_seed], "seeds": per_seed}
    (out / "sync_vs_async.json").write_text(json.dumps(result, indent=2))
    plot_sync_vs_async(result, out / "sync_vs_async.png")
    return result
