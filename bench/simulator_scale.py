"""Peak memory and wall time of whole simulations as the population grows (issue 12, acceptance 2).

Each population size runs in its own process (gpt-tiny, the packaged device mix and GPU nodes),
with the packaged simulator federation opened up so that many device tasks are in flight at
once: ``max_in_flight`` 1,500 tasks, ``buffer_k`` 100, ``tau_max`` 30. Versions stay paced by the
GPU nodes (``paced_by``), so a version is 100 node updates (50 rounds of the 2 nodes) and every
device update that arrives meanwhile: thousands per version, which the default ``filter`` defence
judges together at the flush (``robust.filter_passing``, in bounded column blocks). Per-device
state must cost memory for the tasks in flight, not for the population: error-feedback residuals
live on disk between a device's tasks (``simulator.residuals``). The baseline is the smallest population: peak
RSS at 100x the devices, with as many tasks in flight, should stay close to it.

Reported per size: wall seconds (set-up included), peak RSS of that process, the most device
tasks in flight when a version was published, updates accepted, versions.

Run: ``python bench/simulator_scale.py`` (1,000, 10,000 and 100,000 devices; ``--devices`` to
choose). The last line is the JSON of the issue.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

SIM_TOML = """
[simulation]
max_versions = {versions}
eval_every = 1000
eval_batches = 1
baseline = false
[population]
devices = {devices}
[federation]
file = "fed.toml"
"""
OPENED_UP = {"buffer_k": 100, "tau_max": 30, "max_in_flight": 1500}


def federation_toml() -> str:
    """The simulator's packaged federation file with the OPENED_UP settings."""
    text = resources.files("stamen.simulator").joinpath("federation.toml").read_text()
    for key, value in OPENED_UP.items():
        text, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", text, flags=re.M)
        assert n == 1, f"{key} is not set once in the packaged federation.toml"
    return text


def one(devices: int, versions: int) -> dict:
    """Run one simulation in this process and measure it."""
    import torch

    from stamen.simulator.config import load_simulation
    from stamen.simulator.engine import Simulation

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "sim.toml").write_text(SIM_TOML.format(devices=devices, versions=versions))
        (Path(d) / "fed.toml").write_text(federation_toml())
        setup = load_simulation(Path(d) / "sim.toml")
    sim = Simulation(setup.sim, setup.fed, setup.classes)
    in_flight = []

    def published(_: int) -> None:
        c = sim.result.counters
        in_flight.append(c.tasks - c.accepted - c.stale - c.lapsed - c.refused - c.dropped)

    result = sim.run(on_version=published)
    return {"devices": devices, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "max_tasks_in_flight": max(in_flight, default=0), "accepted": result.counters.accepted,
            "versions": result.flushes[-1]["version"] if result.flushes else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--versions", type=int, default=8, help="versions each simulation publishes")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.devices[0], args.versions)))
        return
    rows = []
    for n in args.devices:
        out = subprocess.run([sys.executable, __file__, "--one", "--devices", str(n), "--versions", str(args.versions)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"runs": rows, "rss_ratio_largest_to_smallest":
                      round(rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 2)}))


if __name__ == "__main__":
    main()
