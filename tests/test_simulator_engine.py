"""The virtual-clock engine drives the real scheduler, aggregator and codecs, deterministically."""

import dataclasses
import json

import pytest
import torch

from stamen.server.aggregator import Aggregator, StaleUpdate
from stamen.server.config import load_config
from stamen.simulator.compare import synchronous
from stamen.simulator.engine import SimConfig, Simulation
from stamen.simulator.profiles import PopulationConfig, load_classes

FED_TOML = """
[aggregation]
buffer_k = 4
tau_max = 2
[training]
seq_len = 32
[tiers.phone-low]
steps = 2
batch_size = 2
[tiers.phone-high]
steps = 3
batch_size = 2
[tiers.jetson]
steps = 2
batch_size = 2
[tiers.gpu]
steps = 20
batch_size = 4
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "federation.toml"
    path.write_text(FED_TOML)
    return load_config(path)


def always_on(dropout: float = 0.0, session_s: float = 1e9):
    """The packaged classes, online all day, so a short test sees every class work."""
    return {n: dataclasses.replace(c, window=(0.0, 24.0), session_s=session_s, gap_s=1.0, dropout=dropout,
                               overhead_s=1.0)
            for n, c in load_classes().items()}


def simulate(fed, seed=0, devices=16, versions=3, **classes_kw):
    torch.set_num_threads(1)
    population = PopulationConfig(devices=devices, mix={"phone-low": 0.5, "phone-high": 0.25, "laptop": 0.25},
                                  gpu_nodes={}, seed=seed)
    config = SimConfig(population=population, seed=seed, max_versions=versions, eval_every=1, eval_batches=2)
    sim = Simulation(config, fed, always_on(**classes_kw))
    return sim, sim.run()


def test_same_seed_same_summary(fed):
    _, a = simulate(fed)
    _, b = simulate(fed)
    assert json.dumps(a.summary(), sort_keys=True) == json.dumps(b.summary(), sort_keys=True)
    _, c = simulate(fed, seed=1)
    assert json.dumps(a.summary(), sort_keys=True) != json.dumps(c.summary(), sort_keys=True)


def test_updates_flow_through_the_real_aggregator(fed):
    sim, r = simulate(fed)
    s = r.summary()
    c = s["counters"]
    assert s["versions"] == sim.coord.version == 3
    # Every flush merged buffer_k = 4 accepted updates; updates accepted after the last flush wait in the buffer.
    assert all(f["updates"] == 4 for f in r.flushes)
    assert c["accepted"] == 12 + sim.coord.buffered
    assert c["accepted"] == sum(t["updates"] for t in s["per_tier"].values()) == len(r.staleness)
    for key in c:  # the per-class counters add up to the totals
        assert sum(row[key] for row in s["per_class"].values()) == pytest.approx(c[key], abs=0.01)
    assert sum(row["accepted"] > 0 for row in s["per_class"].values()) >= 2, "phones and laptops both contribute"
    assert c["tasks"] >= c["accepted"] + c["stale"] and c["bytes_up"] > 0 and c["bytes_down"] > 0
    for hw, row in s["per_class"].items():  # busy time is within the run (utilisation <= 100%)
        assert 0 <= row["busy_s"] <= s["devices"][hw] * s["end_time_h"] * 3600 + 1e-6
    # The real scheduler chose the tiers; tokens per update are that tier's steps x batch x seq.
    assert set(s["per_tier"]) <= set(sim.tiers.values())
    for tier, row in s["per_tier"].items():
        t = fed.tiers[tier]
        assert row["tokens"] == row["updates"] * t.steps * t.batch_size * 32
    # Time moves forward and training helps.
    times = [f["time_h"] for f in r.flushes]
    assert times == sorted(times) and times[0] > 0
    assert r.evals[0]["version"] == 0 and r.evals[-1]["val_loss"] < r.evals[0]["val_loss"]


def test_sessions_too_short_drop_every_task(fed):
    _, r = simulate(fed, session_s=1e-3, versions=1)
    c = r.counters
    assert c.accepted == 0 and c.dropped == c.tasks > 0 and r.flushes == []


def test_each_class_trains_its_own_tier(fed):
    sim, r = simulate(fed)
    # gpt-tiny fits every device's memory; the hardware class still caps the plan.
    assert {sim.tiers[d.id] for d in sim.devices} == {"phone-low", "phone-high", "laptop"}
    assert all(sim.tiers[d.id] == d.hardware for d in sim.devices)
    assert len(r.per_tier) >= 2


def test_a_stale_refusal_frees_the_task(fed):
    torch.set_num_threads(1)
    population = PopulationConfig(devices=16, mix={"phone-low": 1.0}, gpu_nodes={}, seed=0)
    sim = Simulation(SimConfig(population=population, max_versions=6, eval_every=6, eval_batches=1), fed, always_on())
    abandoned = []
    admit = sim.coord.admit

    def recording(client_id, task, body):
        try:
            return admit(client_id, task, body)
        except StaleUpdate:
            abandoned.append(task)
            raise

    sim.coord.admit = recording
    c = sim.run().counters
    assert c.stale > 0, "16 devices in flight over K = 4 with tau_max = 2 refuse some updates"
    # Each refusal closed its task at once, as the server does on a 409 (not held until the
    # deadline): the refused devices asked again and got new tasks.
    assert len(abandoned) == c.stale
    assert not any(sim.coord.is_open(t.task_id) for t in abandoned)
    assert c.lapsed == 0 and c.refused == 0
    refused = {t.client_id for t in abandoned}
    assert all(any(t.client_id == cid for t in sim.coord.open_tasks()) for cid in refused)


def test_gpu_nodes_train_on_the_whole_split_devices_on_partitions(fed):
    population = PopulationConfig(devices=6, mix={"laptop": 1.0}, gpu_nodes={"gpu-h100": 1}, seed=0)
    sim = Simulation(SimConfig(population=population, text="shared"), fed, always_on())
    gpu = [d for d in sim.devices if d.capabilities.role == "gpu"]
    devices = [d for d in sim.devices if d.capabilities.role == "device"]
    assert len(gpu) == 1 and len(devices) == 6
    whole = sum(int((r[1] - r[0])) for r in sim.shards[gpu[0].id].ranges)
    parts = [sum(int(r[1] - r[0]) for r in sim.shards[d.id].ranges) for d in devices]
    assert sum(parts) == whole and all(0 < p < whole for p in parts)  # the devices' parts tile the split


def test_pooled_text_gives_the_gpu_nodes_every_package_and_the_devices_the_private_ones(fed):
    population = PopulationConfig(devices=6, mix={"laptop": 1.0}, gpu_nodes={"gpu-h100": 1}, seed=0)
    held = {}
    for text in ("shared", "private", "pooled"):
        sim = Simulation(SimConfig(population=population, text=text), fed, always_on())
        size = {d.id: sum(int(r[1] - r[0]) for r in sim.shards[d.id].ranges) for d in sim.devices}
        nodes = sum(size[d.id] for d in sim.devices if d.capabilities.role == "gpu")
        devices = sum(size[d.id] for d in sim.devices if d.capabilities.role == "device")
        held[text] = nodes, devices, set(sim.val)
    whole = held["shared"][0]
    assert held["private"][0] + held["private"][1] == whole  # public to the nodes, private to the devices
    assert held["pooled"][0] == whole > held["private"][0]  # pooled: the nodes read the devices' text too
    assert held["pooled"][1] == held["private"][1]
    assert held["pooled"][2] == held["private"][2] == {"all", "public", "private"}


def test_a_gpu_node_reads_the_same_batches_with_or_without_devices(fed):
    """The node's data order comes from its own stream, not from how many tasks the server
    issued: compare's mixed and gpu-only runs then differ by what the devices do."""
    torch.set_num_threads(1)
    seen = {}
    for devices in (0, 6):
        population = PopulationConfig(devices=devices, mix={"laptop": 1.0}, gpu_nodes={"gpu-h100": 1}, seed=0)
        sim = Simulation(SimConfig(population=population, max_versions=3, eval_every=3, eval_batches=1), fed,
                         always_on())
        starts, draw = seen.setdefault(devices, []), sim._batches

        def recorded(job, draw=draw, starts=starts):
            stream = draw(job)
            if job.device.capabilities.role == "gpu":
                starts.append(stream.rng.bit_generator.state)  # where its batches start from
            return stream

        sim._batches = recorded
        sim.run()
    n = min(len(seen[0]), len(seen[6]))
    assert n >= 2 and seen[0][:n] == seen[6][:n]


def test_paced_by_the_nodes_devices_weighing_nothing_change_nothing(fed, monkeypatch):
    """With versions paced by the GPU nodes, a federation whose device updates weigh 0 (the
    aggregator's admission patched here to say so) publishes exactly the nodes-alone run's
    versions: the devices' arrivals no longer move the nodes' flushes, so devices can only add."""
    torch.set_num_threads(1)
    paced = dataclasses.replace(fed, aggregation=dataclasses.replace(fed.aggregation, buffer_k=2, paced_by=("gpu",)))
    check = Aggregator.check
    monkeypatch.setattr(Aggregator, "check", lambda self, u: check(self, u) if u.plan.name == "gpu"
                        else dataclasses.replace(check(self, u), weight=0.0))
    final = {}
    for devices in (0, 8):
        population = PopulationConfig(devices=devices, mix={"laptop": 0.5, "phone-high": 0.5},
                                      gpu_nodes={"gpu-h100": 2}, seed=0)
        sim = Simulation(SimConfig(population=population, max_versions=3, eval_every=3, eval_batches=1), paced,
                         always_on())
        result = sim.run()
        final[devices] = (sim.coord.version, dict(sim.weights), result.per_tier)
    assert final[0][0] == final[8][0] == 3
    assert set(final[8][2]) > {"gpu"} and final[0][2]["gpu"] == final[8][2]["gpu"]  # devices did send updates
    assert all(torch.equal(final[0][1][n], final[8][1][n]) for n in final[0][1])


def test_nodes_paced_alone_are_synchronous_rounds_bit_for_bit(fed):
    """Two GPU nodes alone, versions paced by them (K = 2, ``paced_by = ["gpu"]``, FedBuff's
    async mode), publish exactly DiLoCo's synchronous rounds (``mode = "rounds"``, K = 2,
    tau_max = 0, the reference): a node back first waits for its peer's update instead of
    training from the version that update replaces, so no node update is stale."""
    torch.set_num_threads(1)
    paced = dataclasses.replace(fed, aggregation=dataclasses.replace(fed.aggregation, buffer_k=2, paced_by=("gpu",)))
    final = []
    for run in (paced, synchronous(fed, 0, gpu_nodes=2)):
        population = PopulationConfig(devices=0, gpu_nodes={"gpu-h100": 2}, seed=0)
        sim = Simulation(SimConfig(population=population, max_versions=4, eval_every=4, eval_batches=1), run,
                         always_on())
        result = sim.run()
        final.append((sim.coord.version, result.staleness, [f["updates"] for f in result.flushes], dict(sim.weights)))
    assert final[0][0] == final[1][0] == 4
    assert final[0][1] == final[1][1] == [0] * 8 and final[0][2] == final[1][2] == [2, 2, 2, 2]
    assert all(torch.equal(final[0][3][n], final[1][3][n]) for n in final[0][3])


def test_paced_by_a_tier_nobody_is_in_counts_every_update(fed):
    """``paced_by = ["gpu"]`` in a federation without GPU nodes: versions are published as
    under FedBuff's count of any K updates, bit for bit the run with ``paced_by`` empty (the
    reference), instead of once per max_wait_s."""
    torch.set_num_threads(1)
    agg = dataclasses.replace(fed.aggregation, buffer_k=2, max_wait_s=10.0)
    final = []
    for paced_by in ((), ("gpu",)):
        sim, result = simulate(dataclasses.replace(fed, aggregation=dataclasses.replace(agg, paced_by=paced_by)),
                               versions=4)
        final.append((sim.coord.version, [f["updates"] for f in result.flushes], dict(sim.weights)))
    assert final[0][0] == final[1][0] == 4 and final[0][1] == final[1][1] == [2, 2, 2, 2]
    assert all(torch.equal(final[0][2][n], final[1][2][n]) for n in final[0][2])


def test_places_in_flight_pass_among_the_devices(fed):
    """With the cap on device tasks in flight binding, a device back with its update yields its
    place to the devices refused meanwhile (``Scheduler._yields``): more devices train than there
    are places. First come, first served, the first 4 kept them for the whole run."""
    capped = dataclasses.replace(fed, scheduler=dataclasses.replace(fed.scheduler, max_in_flight=4))
    torch.set_num_threads(1)
    population = PopulationConfig(devices=16, mix={"phone-high": 0.5, "laptop": 0.5}, gpu_nodes={}, seed=0)
    sim = Simulation(SimConfig(population=population, max_versions=8, eval_every=8, eval_batches=1), capped,
                     always_on())
    trained = set()
    accepted = sim._accepted
    sim._accepted = lambda job, tau, nbytes: (trained.add(job.device.id), accepted(job, tau, nbytes))
    sim.run()
    assert sim.coord.version == 8 and len(trained) > 8
