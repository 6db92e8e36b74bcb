"""Synchronous rounds against asynchronous buffering on the same population (FedBuff's
question): how many virtual hours each needs to reach the same validation loss.

Synchronous FedAvg/DiLoCo is the same scheduler and aggregator with all K tasks of a round
merged into one version (``buffer_k = K``), nothing stale accepted (``tau_max = 0``), and the
engine issuing no more than K tasks per version (``SimConfig.rounds``). A round then waits for
its slowest device, and a device that drops out holds its slot until the task's deadline — the
straggler cost that asynchronous buffering avoids.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stamen.server.config import FederationConfig
from stamen.simulator.config import SimSetup
from stamen.simulator.engine import Simulation
from stamen.simulator.report import plot_sync_vs_async


def synchronous(fed: FederationConfig, cohort: int) -> FederationConfig:
    """``fed`` run as synchronous rounds of ``cohort`` devices."""
    return replace(fed, aggregation=replace(fed.aggregation, buffer_k=cohort, tau_max=0))


def hours_to_loss(evals: list[dict], target: float) -> float | None:
    """The virtual time of the first evaluation at or below ``target`` (None if never)."""
    return next((e["time_h"] for e in evals if e["val_loss"] <= target), None)


def sync_vs_async(setup: SimSetup, out: Path) -> dict:
    """Run the setup as configured (async) and as synchronous rounds of ``buffer_k`` devices;
    the target is the worse of the two final losses, so both reach it."""
    out.mkdir(parents=True, exist_ok=True)
    sync = synchronous(setup.fed, setup.fed.aggregation.buffer_k)
    runs = {"async": Simulation(setup.sim, setup.fed, setup.classes).run().summary(),
            "sync": Simulation(replace(setup.sim, rounds=True), sync, setup.classes).run().summary()}
    target = max(r["final_val_loss"] for r in runs.values())
    hours = {name: hours_to_loss(r["evals"], target) for name, r in runs.items()}
    result = {"target_val_loss": target, "hours_to_target": hours,
              "async_speedup": hours["sync"] / hours["async"] if hours["async"] else None,
              "runs": {name: {k: r[k] for k in ("versions", "end_time_h", "counters", "mean_staleness", "evals", "flushes")}
                       for name, r in runs.items()}}
    (out / "sync_vs_async.json").write_text(json.dumps(result, indent=2))
    plot_sync_vs_async(result, out / "sync_vs_async.png")
    return result
