"""Synchronous rounds against asynchronous buffering on the same population (FedBuff's
question): how many virtual hours each needs to reach the same validation loss.

Synchronous FedAvg/DiLoCo is the same scheduler and aggregator with a round's tasks merged into
one version: every GPU node once plus ``K`` devices (``buffer_k = K + nodes``), nothing stale
accepted (``tau_max = 0``), and the engine issuing no more per version (``SimConfig.rounds``).
A round waits for its slowest member; one that drops out holds its slot until the task's
deadline, and the round closes with what it has once its first update has waited that long
(``max_wait_s``) — the straggler cost that asynchronous buffering avoids.

The target comes from the async run as configured (90% of the way from the initial loss to its
final one: the last evaluations are the noisiest, and one of them should not decide the
result). The synchronous run then goes on, under the same virtual-time horizon and a version
cap ``SYNC_VERSIONS`` times the async one, until it reaches the target or runs out.
"""

from __future__ import annotations

import json
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
    a = replace(fed.aggregation, buffer_k=cohort + gpu_nodes, tau_max=0,
                max_wait_s=fed.scheduler.task_deadline_s, min_quorum=1)
    return replace(fed, aggregation=a)


def hours_to_loss(evals: list[dict], target: float) -> float | None:
    """The virtual time of the first evaluation at or below ``target`` (None if never)."""
    return next((e["time_h"] for e in evals if e["val_loss"] <= target), None)


def target_loss(evals: list[dict]) -> float:
    """``TARGET_FRACTION`` of the way from the first evaluation's loss to the last's."""
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    return first - TARGET_FRACTION * (first - last)


def sync_vs_async(setup: SimSetup, out: Path) -> dict:
    """Run the setup as configured (async), take the target from it, and run it as synchronous
    rounds of ``buffer_k`` devices until they reach that target; write the JSON and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    # Both evaluate every version: at the configured spacing a run's time to target would be
    # rounded up to its next evaluation, by up to several rounds for the synchronous run.
    asyn = Simulation(replace(setup.sim, eval_every=1), setup.fed, setup.classes)
    runs = {"async": asyn.run().summary()}
    target = target_loss(runs["async"]["evals"])
    sync = synchronous(setup.fed, setup.fed.aggregation.buffer_k, asyn.gpu_nodes)
    sim = replace(setup.sim, eval_every=1, rounds=True, max_versions=SYNC_VERSIONS * max(1, runs["async"]["versions"]))
    runs["sync"] = Simulation(sim, sync, setup.classes).run(target_loss=target).summary()
    hours = {name: hours_to_loss(r["evals"], target) for name, r in runs.items()}
    result = {"target_val_loss": target, "hours_to_target": hours,
              "async_speedup": hours["sync"] / hours["async"] if hours["sync"] and hours["async"] else None,
              "runs": {name: {k: r[k] for k in ("versions", "end_time_h", "counters", "per_tier", "mean_staleness",
                                                "evals", "flushes")}
                       for name, r in runs.items()}}
    (out / "sync_vs_async.json").write_text(json.dumps(result, indent=2))
    plot_sync_vs_async(result, out / "sync_vs_async.png")
    return result
