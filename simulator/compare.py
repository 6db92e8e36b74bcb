"""Side-by-side variants of one population and seed.

``compare``: the federation as configured ("mixed") against its GPU nodes alone and its devices
alone, all stopped at the same virtual time, and centralized training on all the text at the
mixed run's tokens: the project's test (do devices make the model better than the GPU nodes
alone, and how close does the federation come to centralizing the text?), and centralized
training at the devices-alone run's tokens (how close do the devices' own tokens come?). With
private device text, "gpu-only-pooled" is the GPU nodes alone reading the devices' text too, at
their own steps: the most that text could give them, without the centralized run's other steps
(at seeds 1 and 2 of the stdlib's private scenario it gives the nodes 0.2-0.3% on private text,
at seed 0 17%: docs/FINDINGS.md, session 16). Final losses per validation domain (all; public
and private with private device text), per seed and as medians.

``sync_vs_async``: synchronous rounds against asynchronous buffering on the same population
(FedBuff's question): how many virtual hours each needs to reach the same validation loss.

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
from typing import Callable

from stamen.core.baseline import BaselineConfig, run_baseline
from stamen.core.errors import UserError
from stamen.server.config import FederationConfig
from stamen.simulator.config import SimSetup
from stamen.simulator.engine import EVAL_BATCH, Simulation
from stamen.simulator.report import plot_compare, plot_sync_vs_async

VARIANTS = ("mixed", "gpu-only", "devices-only", "gpu-only-pooled")

TARGET_FRACTION = 0.9  # of the async run's loss drop that both runs must reach
SYNC_VERSIONS = 4  # the sync run's version cap, as a multiple of the async run's


def synchronous(fed: FederationConfig, cohort: int, gpu_nodes: int = 0) -> FederationConfig:
    """``fed`` run as synchronous rounds of ``cohort`` devices plus every GPU node, each round
    closing at the task deadline with whatever arrived."""
    a = replace(fed.aggregation, mode="rounds", buffer_k=cohort + gpu_nodes, tau_max=0, paced_by=(),
                max_wait_s=fed.scheduler.task_deadline_s, min_quorum=1)
    return replace(fed, aggregation=a)


def device_cohort(fed: FederationConfig, run: dict, gpu_nodes: int) -> int:
    """Devices per synchronous round: the async run's K, or, when its versions are paced by
    some tiers' updates (``paced_by``: K counts only those), as many devices as its versions
    merged (the median flush's updates less the nodes')."""
    if not fed.aggregation.paced_by:
        return fed.aggregation.buffer_k
    return max(1, round(statistics.median(f["updates"] for f in run["flushes"])) - gpu_nodes)


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
    sync = synchronous(setup.fed, device_cohort(setup.fed, runs["async"], asyn.gpu_nodes), asyn.gpu_nodes)
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


def variant(setup: SimSetup, name: str) -> SimSetup:
    """The population as configured ("mixed"), without its devices ("gpu-only": each version
    then merges one update per node, as DiLoCo's workers), without its GPU nodes, or without
    its devices but with their private text handed to the GPU nodes ("gpu-only-pooled": the
    most the devices' text could give the nodes' own steps, the reference for "mixed" on
    private text)."""
    sim, pop, fed = setup.sim, setup.sim.population, setup.fed
    nodes = sum(pop.gpu_nodes.values())
    if name == "mixed":
        return setup
    if name in ("gpu-only", "gpu-only-pooled"):
        if not nodes:
            raise UserError(f"the population has no GPU nodes to run {name}")
        if name == "gpu-only-pooled":
            if sim.text != "private":
                raise UserError(f'gpu-only-pooled hands the devices\' private text to the GPU nodes: it needs text = "private", '
                                f"not {sim.text!r}")
            sim = replace(sim, text="pooled")
        fed = replace(fed, aggregation=replace(fed.aggregation, buffer_k=nodes))
        return replace(setup, sim=replace(sim, population=replace(pop, devices=0)), fed=fed)
    if name == "devices-only":
        if not pop.devices:
            raise UserError("the population has no devices to run devices-only")
        return replace(setup, sim=replace(sim, population=replace(pop, gpu_nodes={})))
    raise UserError(f"unknown variant {name!r}: use {', '.join(VARIANTS)}")


def run_variant(setup: SimSetup, name: str, end_h: float | None = None,
                on_version: Callable[[int], None] | None = None) -> tuple[Simulation, dict]:
    """The variant run to its own horizon, or to ``end_h`` virtual hours (another run's end:
    variants are compared at equal virtual time, whatever versions each publishes)."""
    s = variant(setup, name)
    sim = s.sim if end_h is None else replace(s.sim, horizon_h=end_h, max_versions=10**9)
    simulation = Simulation(sim, s.fed, s.classes)
    return simulation, simulation.run(on_version=on_version).summary()


def _final(evals: list[dict]) -> dict[str, float]:
    last = evals[-1]
    return {k.removeprefix("val_").replace("loss", "all"): v for k, v in last.items() if k.startswith("val_")}


def centralized(setup: SimSetup, tokens: int, out: Path, val: dict[str, list], progress: bool = False) -> dict:
    """Centralized training on all the training text for ``tokens`` (the baseline's summary),
    validated on a simulation's domains (``Simulation.val``: the baseline's own held-out text
    is "all", so only the others are passed on)."""
    domains = {k: v for k, v in val.items() if k != "all"}
    return run_baseline(BaselineConfig(model=setup.sim.model, data=setup.sim.data, tokens=tokens, batch_size=EVAL_BATCH,
                                       seq_len=setup.fed.training.seq_len, eval_batches=setup.sim.eval_batches,
                                       seed=setup.sim.seed), out, progress=progress, domains=domains)


def _centralized(setup: SimSetup, tokens: int, out: Path, val: dict[str, list]) -> dict:
    base = centralized(setup, tokens, out, val)
    return {"tokens": base["tokens"], "final": {"all": base["final_val_loss"], **base.get("final_by_domain", {})},
            "val_curve": base["val_curve"]}


def compare_variants_once(setup: SimSetup, names: tuple[str, ...], out: Path) -> dict:
    """Each variant of one population and seed, to the virtual time the first one reaches
    (its horizon or version cap), then centralized training at the first one's tokens
    (``centralized_equal_tokens``) and, with ``devices-only`` among the variants, at the devices'
    tokens too (``centralized_devices_tokens``): devices alone train far fewer tokens than the
    federation in the same time, so the first baseline says how far the federation is from
    centralizing its text, the second how far the devices' own work is."""
    runs, sims, end_h = {}, {}, None
    for name in names:
        sims[name], runs[name] = run_variant(setup, name, end_h)
        end_h = runs[name]["end_time_h"] if end_h is None else end_h
    val = sims[names[0]].val
    seed = setup.sim.seed
    result = {"seed": seed, "virtual_h": end_h, "text": setup.sim.text,
              "final": {name: _final(r["evals"]) for name, r in runs.items()},
              "centralized_equal_tokens": _centralized(setup, runs[names[0]]["counters"]["tokens"],
                                                       out / f"centralized-seed{seed}", val)}
    if "devices-only" in names:
        result["centralized_devices_tokens"] = _centralized(setup, runs["devices-only"]["counters"]["tokens"],
                                                            out / f"centralized-devices-seed{seed}", val)
    result["runs"] = {name: {k: r[k] for k in ("versions", "end_time_h", "counters", "per_tier", "evals")}
                      for name, r in runs.items()}
    return result


def compare(setup: SimSetup, names: tuple[str, ...], out: Path, seeds: int = 3) -> dict:
    """``compare_variants_once`` for seeds ``setup.sim.seed`` onwards; ``compare.json`` holds
    every seed's runs and the medians per variant and domain, one plot per domain the first
    seed's curves."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in range(setup.sim.seed, setup.sim.seed + seeds):
        sim = replace(setup.sim, seed=seed, population=replace(setup.sim.population, seed=seed))
        per_seed.append(compare_variants_once(replace(setup, sim=sim), names, out))
    domains = list(per_seed[0]["final"][names[0]])
    median = {name: {d: statistics.median(r["final"][name][d] for r in per_seed) for d in domains} for name in names}
    for base in ("centralized_equal_tokens", "centralized_devices_tokens"):
        if base in per_seed[0]:
            median[base] = {d: statistics.median(r[base]["final"][d] for r in per_seed) for d in domains}
    result = {"variants": list(names), "domains": domains, "median": median, "seeds": per_seed}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    for d in domains:
        plot_compare(result, d, out / f"compare_{d}.png")
    return result
