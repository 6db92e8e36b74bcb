"""``simulate`` writes a deterministic report folder; sync vs async runs on the same devices."""

import dataclasses
import json

import pytest
import torch

from stamen.core.errors import UserError
from stamen.simulator.compare import compare, hours_to_loss, sync_vs_async, synchronous, variant
from stamen.simulator.config import load_simulation
from stamen.simulator.engine import Simulation
from stamen.simulator.run import simulate

SIM_TOML = """
[simulation]
max_versions = 3
eval_every = 1
eval_batches = 1
[population]
devices = 12
profiles = "always_on.toml"
[population.mix]
laptop = 0.5
jetson = 0.5
[population.gpu_nodes]
[federation]
file = "fed.toml"
"""
FED_TOML = """
[aggregation]
buffer_k = 3
tau_max = 4
[training]
seq_len = 32
[tiers.laptop]
steps = 2
batch_size = 2
[tiers.jetson]
steps = 2
batch_size = 2
[tiers.gpu]                # the packaged 200 steps x 16 made the GPU-node tests most of this file's time
steps = 4
batch_size = 2
"""
CLASS = """
[{name}]
role = "{role}"
flops = {flops}
memory_mb = 4096
up_mbps = 10
down_mbps = 50
runtimes = ["torch"]
accelerator = ""
cores = 4
window = [0, 24]
session_min = 1e6
gap_min = 0.1
dropout = {dropout}
overhead_s = 1.0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    (d / "sim.toml").write_text(SIM_TOML)
    (d / "fed.toml").write_text(FED_TOML)
    # Jetsons are 10x slower than laptops and sometimes drop out: stragglers for sync rounds.
    (d / "always_on.toml").write_text(CLASS.format(name="laptop", flops=1e10, dropout=0.0, role="device")
                                      + CLASS.format(name="jetson", flops=1e9, dropout=0.2, role="device")
                                      + CLASS.format(name="gpu-x", flops=1e12, dropout=0.0, role="gpu"))
    torch.set_num_threads(1)
    return load_simulation(d / "sim.toml")


def test_report_folder_is_complete_and_deterministic(setup, tmp_path):
    a = simulate(setup, tmp_path / "a", progress=False)
    simulate(setup, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()
    for name in ("config.json", "model.safetensors"):  # the final weights, as a model folder
        assert (tmp_path / "a" / "model" / name).read_bytes() == (tmp_path / "b" / "model" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["stamen"]["version"] == 3
    for name in ("loss.png", "devices.png", "staleness.png"):
        assert (tmp_path / "a" / name).read_bytes()[:4] == b"\x89PNG"
    timing = json.loads((tmp_path / "a" / "timing.json").read_text())
    assert timing["peak_rss_mib"] > 0 and timing["wall_s"] >= timing["simulation_wall_s"] > 0
    assert a["versions"] == 3 and a["counters"]["accepted"] >= 9
    # The centralized baseline trained as many tokens as the accepted updates, in whole steps
    # of 32 sequences x 32 tokens.
    assert a["counters"]["tokens"] == a["evals"][-1]["tokens"]
    assert a["baseline"]["tokens"] == max(1, a["counters"]["tokens"] // 1024) * 1024
    assert "gpu_only" not in a  # no GPU nodes to run alone


def test_report_holds_the_gpu_nodes_alone(setup, tmp_path):
    sim = dataclasses.replace(setup.sim, text="private", max_versions=4, eval_every=2,
                              population=dataclasses.replace(setup.sim.population, gpu_nodes={"gpu-x": 2}))
    paced = dataclasses.replace(setup.fed.aggregation, buffer_k=2, paced_by=("gpu",))  # as the packaged default
    s = simulate(dataclasses.replace(setup, sim=sim, fed=dataclasses.replace(setup.fed, aggregation=paced)), tmp_path,
                 progress=False)
    # The reference: the engine itself on the population without its devices, each version one
    # update per node (DiLoCo's workers), stopped at the virtual time the federated run ended.
    alone_sim = dataclasses.replace(sim, horizon_h=s["end_time_h"], max_versions=10**9,
                                    population=dataclasses.replace(sim.population, devices=0))
    alone_fed = dataclasses.replace(setup.fed, aggregation=paced)
    ref = Simulation(alone_sim, alone_fed, setup.classes).run().summary()
    alone = s["gpu_only"]
    assert alone["evals"] == ref["evals"] and alone["counters"] == ref["counters"]
    assert alone["versions"] == ref["versions"] >= 1 and alone["final_val_loss"] == ref["evals"][-1]["val_loss"]
    assert alone["end_time_h"] <= s["end_time_h"] and s["per_tier"].keys() - {"gpu"}  # devices were in the run
    assert {"val_public", "val_private"} <= alone["evals"][-1].keys()
    assert s["baseline"]["final_by_domain"].keys() == {"public", "private"}
    assert json.loads((tmp_path / "summary.json").read_text())["gpu_only"] == alone
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_synchronous_is_the_same_machinery(setup):
    fed = synchronous(setup.fed, 3)
    assert (fed.aggregation.buffer_k, fed.aggregation.tau_max) == (3, 0)
    assert fed.tiers == setup.fed.tiers


def test_hours_to_loss():
    evals = [{"time_h": 0.0, "val_loss": 5.0}, {"time_h": 1.0, "val_loss": 4.0}, {"time_h": 2.0, "val_loss": 3.0}]
    assert hours_to_loss(evals, 4.0) == 1.0 and hours_to_loss(evals, 3.5) == 2.0 and hours_to_loss(evals, 1.0) is None


def test_sync_vs_async(setup, tmp_path):
    r = sync_vs_async(setup, tmp_path, seeds=2)
    assert [s["seed"] for s in r["seeds"]] == [0, 1]
    first = r["seeds"][0]
    sync, asyn = first["runs"]["sync"], first["runs"]["async"]
    # Each version merged exactly one round of K = 3 tasks issued at the version before it;
    # a round over-selects ceil(1.3 * 3) = 4 devices, and a late one is refused as stale.
    assert sync["mean_staleness"] == 0
    assert all(f["updates"] == 3 for f in sync["flushes"])
    assert sync["counters"]["stale"] > 0 and sync["counters"]["accepted"] == 3 * sync["versions"]
    assert first["hours_to_target"]["sync"] is not None and first["hours_to_target"]["async"] is not None
    # Rounds wait for the slow jetsons; the async buffer merges whoever is done.
    assert sync["end_time_h"] > asyn["end_time_h"]
    speedups = [s["hours_to_target"]["sync"] / s["hours_to_target"]["async"] for s in r["seeds"]]
    assert r["async_speedups"] == speedups and r["median_async_speedup"] == sum(speedups) / 2
    assert (tmp_path / "sync_vs_async.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_variants_on_private_text(setup, tmp_path):
    sim = dataclasses.replace(setup.sim, text="private", max_versions=8, eval_every=4,
                              population=dataclasses.replace(setup.sim.population, gpu_nodes={"gpu-x": 2}))
    r = compare(dataclasses.replace(setup, sim=sim), ("mixed", "gpu-only", "devices-only", "gpu-only-pooled"), tmp_path,
                seeds=1)
    (one,) = r["seeds"]
    runs = one["runs"]
    assert r["domains"] == ["all", "public", "private"]
    # All variants stop at the virtual time the first one reached; each has only its own clients.
    assert runs["mixed"]["versions"] == 8 and one["virtual_h"] == runs["mixed"]["end_time_h"]
    assert all(run["end_time_h"] <= one["virtual_h"] + 1e-12 for run in runs.values())
    assert set(runs["gpu-only"]["per_tier"]) == {"gpu"} and "gpu" not in runs["devices-only"]["per_tier"]
    # The same nodes on the pooled text (other batches, so other losses and upload sizes).
    pooled = runs["gpu-only-pooled"]
    assert set(pooled["per_tier"]) == {"gpu"} and pooled["counters"]["accepted"] > 0
    assert pooled["evals"][-1]["val_loss"] != runs["gpu-only"]["evals"][-1]["val_loss"]
    assert {"gpu", "laptop"} <= set(runs["mixed"]["per_tier"])
    for name, run in runs.items():
        last = run["evals"][-1]
        assert one["final"][name] == {"all": last["val_loss"], "public": last["val_public"],
                                      "private": last["val_private"]}
        assert r["median"][name] == one["final"][name]  # one seed: the median is that seed
    central = one["centralized_equal_tokens"]
    assert central["tokens"] == max(1, runs["mixed"]["counters"]["tokens"] // 1024) * 1024
    assert set(central["final"]) == {"all", "public", "private"}
    # Devices alone train far fewer tokens in the same time: a second centralized run at theirs.
    few = one["centralized_devices_tokens"]
    assert few["tokens"] == max(1, runs["devices-only"]["counters"]["tokens"] // 1024) * 1024
    assert set(few["final"]) == {"all", "public", "private"}
    assert r["median"]["centralized_devices_tokens"] == few["final"]
    for d in r["domains"]:
        assert (tmp_path / f"compare_{d}.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "compare.json").read_text())["median"] == r["median"]
    with pytest.raises(UserError, match="needs text"):  # shared text has no private text to pool
        variant(dataclasses.replace(setup, sim=dataclasses.replace(sim, text="shared")), "gpu-only-pooled")
