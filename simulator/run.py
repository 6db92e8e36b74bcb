"""``stamen simulate``: run a simulation, its GPU nodes alone to the same virtual time and the
centralized baseline on as many tokens, and write the report folder: ``summary.json`` and the
final weights (``model/``), deterministic for a seed, ``timing.json`` (wall time and peak memory,
which are not), the plots, and the baseline's own folder."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from stamen.core.gpt2 import save_model
from stamen.core.model import ModelSpec
from stamen.simulator.compare import centralized, run_variant
from stamen.simulator.config import SimSetup
from stamen.simulator.report import write_plots


def simulate(setup: SimSetup, out: Path, progress: bool = True) -> dict:
    """Run ``setup`` and write its report into ``out``; returns the summary. Beside the run, the
    report holds what a reader compares it with: the GPU nodes alone to the same virtual time
    (what the devices add, ``gpu_only``) and centralized training on as many tokens
    (``baseline``), each on the run's validation domains."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=setup.sim.max_versions, desc="simulate", unit="version", disable=not progress)
    sim, result = run_variant(setup, "mixed", on_version=lambda v: bar.update(v - bar.n))
    bar.close()
    summary = {"config": {"simulation": asdict(setup.sim), "federation": asdict(setup.fed)}, **result}
    pop = setup.sim.population
    if setup.sim.nodes_alone and pop.devices and sum(pop.gpu_nodes.values()):
        bar = tqdm(desc="GPU nodes alone", unit="version", disable=not progress)
        _, alone = run_variant(setup, "gpu-only", summary["end_time_h"], on_version=lambda v: bar.update(v - bar.n))
        bar.close()
        summary["gpu_only"] = {k: alone[k] for k in ("versions", "end_time_h", "final_val_loss", "counters", "evals")}
    simulated_s = time.perf_counter() - start
    if setup.sim.baseline and summary["counters"]["tokens"] > 0:
        base = centralized(setup, summary["counters"]["tokens"], out / "baseline", sim.val, progress)
        summary["baseline"] = {k: base[k] for k in ("tokens", "final_val_loss", "val_curve", "final_by_domain") if k in base}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_model(ModelSpec(setup.sim.model), sim.weights, out / "model", extra={"version": summary["versions"]})
    write_plots(summary, out)
    timing = {"wall_s": round(time.perf_counter() - start, 2), "simulation_wall_s": round(simulated_s, 2),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    (out / "timing.json").write_text(json.dumps(timing, indent=2))
    return summary
