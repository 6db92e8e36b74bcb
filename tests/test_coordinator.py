"""The coordinator owns the whole cycle, and the server and the simulator both go through it:
the same malformed update is refused with the same reason by a real HTTP server and by the
virtual-clock simulator."""

import dataclasses
import math

import msgpack
import pytest
import torch

from federation_procs import running_server
from stamen.compression.codecs import encode
from stamen.core.model import PRESETS, weights, GPT
from stamen.core.records import Capabilities, Task
from stamen.server.aggregator import Aggregator, StaleUpdate
from stamen.server.auth import create_token
from stamen.server.config import load_config
from stamen.server.coordinator import Coordinator, RequestError, TaskClosed
from stamen.simulator.engine import SimConfig, Simulation
from stamen.simulator.profiles import PopulationConfig, load_classes
from test_server_http import call

CFG = PRESETS["gpt-tiny"]
FED = """
[aggregation]
buffer_k = 2
tau_max = 0
[training]
seq_len = 32
[tiers.laptop]
steps = 2
batch_size = 2
"""
LAPTOP = Capabilities(role="device", memory_bytes=2**30, flops=1e12, device_class="laptop")
MALFORMED = ("nan", "shape", "tokens", "kind")


def malformed(how: str, task: Task) -> bytes:
    """An upload for ``task`` that breaks one rule: a NaN, a wrong shape, too many tokens, or a
    payload that is not an update."""
    shapes = task.plan.shapes(CFG)
    delta = {n: torch.zeros(shapes[n]) for n in task.plan.trainable(CFG)}
    first = next(iter(delta))
    meta, kind = {"tokens": 1, "loss": 1.0}, "update"
    if how == "nan":
        delta[first].view(-1)[0] = math.nan
    elif how == "shape":
        delta[first] = torch.zeros(3, 3)
    elif how == "tokens":
        meta["tokens"] = 10**9
    else:
        kind = "weights"
    return encode(delta, "fp32+zstd(1)", kind=kind, meta=meta)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "federation.toml"
    path.write_text(FED)
    return load_config(path)


def coordinator(fed):
    torch.manual_seed(0)
    return Coordinator(CFG, fed, Aggregator(CFG, weights(GPT(CFG)), fed.aggregator_config()))


def honest(task: Task, tokens: int = 64) -> bytes:
    shapes = task.plan.shapes(CFG)
    return encode({n: torch.full(shapes[n], 0.01) for n in task.plan.trainable(CFG)}, "fp32+zstd(1)",
                  meta={"tokens": tokens, "loss": 2.0})


def test_the_cycle_issue_admit_accept_publish(fed):
    coord = coordinator(fed)
    for c in "ab":
        coord.register(c, LAPTOP)
    ta, tb = coord.next_task("a", 0.0), coord.next_task("b", 0.0)
    assert coord.next_task("a", 1.0) == ta and coord.in_flight == 2  # a re-poll is idempotent
    with pytest.raises(RequestError, match="another client") as e:
        coord.admit("b", ta, honest(ta))
    assert e.value.status == 403
    admitted = coord.admit("a", ta, honest(ta))
    assert (admitted.staleness, admitted.loss, admitted.update.tokens) == (0, 2.0, 64)
    assert coord.accept(admitted, 1.0).report is None and coord.buffered == 1
    assert coord.admit("a", ta, honest(ta)) is None  # a re-send is a duplicate
    accepted = coord.accept(coord.admit("b", tb, honest(tb)), 2.0)  # K = 2: version 1
    assert accepted.version == coord.version == 1 and accepted.report.updates == 2
    assert coord.global_step == fed.tiers["laptop"].steps and coord.in_flight == 0
    # A task issued at version 1, then a flush: with tau_max = 0 its update is stale, and the
    # coordinator closes the task so the client's next poll gets fresh work.
    tc, td = coord.next_task("a", 3.0), coord.next_task("b", 3.0)
    coord.accept(coord.admit("b", td, honest(td)), 3.0)
    late = coord.next_task("b", 3.5)
    coord.accept(coord.admit("b", late, honest(late)), 4.0)  # version 2
    with pytest.raises(StaleUpdate):
        coord.admit("a", tc, honest(tc))
    assert not coord.is_open(tc.task_id)
    with pytest.raises(TaskClosed):  # and a second try is refused as closed
        coord.admit("a", tc, honest(tc))
    # Deadlines: a task past its deadline lapses and its upload is refused.
    t = coord.next_task("a", 10.0)
    assert coord.expire(t.deadline + 1) == [t]
    with pytest.raises(TaskClosed):
        coord.admit("a", t, honest(t))


def test_a_released_task_closes_and_its_steps_do_not_count(fed):
    coord = coordinator(fed)
    for c in "ab":
        coord.register(c, LAPTOP)
    t = coord.next_task("a", 0.0)
    with pytest.raises(RequestError, match="another client"):
        coord.release("b", t)
    assert coord.release("a", t) and not coord.is_open(t.task_id) and coord.in_flight == 0
    assert not coord.release("a", t)  # already closed: nothing changes
    with pytest.raises(TaskClosed):
        coord.admit("a", t, honest(t))
    fresh = coord.next_task("a", 1.0)
    assert fresh.task_id != t.task_id and fresh.step_offset == t.step_offset == coord.global_step == 0


def test_downloads_are_exact_weights_or_deltas(fed):
    from stamen.compression.downlink import decode_download

    coord = coordinator(dataclasses.replace(fed, aggregation=dataclasses.replace(fed.aggregation, tau_max=1)))
    for c in "ab":
        coord.register(c, LAPTOP)
    plan = coord.assignment("a").plan
    v0 = plan.extract(coord.weights_at(0), CFG)
    for c in "ab":
        t = coord.next_task(c, 0.0)
        coord.accept(coord.admit(c, t, honest(t)), 0.0)
    v1 = plan.extract(coord.weights_at(1), CFG)
    version, whole = decode_download(coord.download(plan, 1))
    assert version == 1 and all(torch.equal(whole[n], v1[n]) for n in v1)
    version, via = decode_download(coord.download(plan, 1, have=0), base=v0, base_version=0)
    assert version == 1 and all(torch.allclose(via[n], v1[n], rtol=0, atol=1e-6) for n in v1)
    for version, have in ((5, None), (1, 7)):  # not published, or no longer kept: 410
        with pytest.raises(RequestError) as e:
            coord.download(plan, version, have)
        assert e.value.status == 410


class Saboteur:
    """A device's encoder that uploads a malformed update instead of its real one."""

    def __init__(self, how: str, sim: Simulation) -> None:
        self.how, self.sim = how, sim

    def encode(self, plan_hash, delta, spec, kind="update", meta=None) -> bytes:
        task = next(t for t in self.sim.coord.open_tasks() if t.plan.hash == plan_hash and set(delta) == set(t.plan.trainable(CFG)))
        return malformed(self.how, task)


def test_the_server_and_the_simulator_refuse_alike(fed, tmp_path):
    # The simulator: eight laptops, four of them each sending one kind of malformed update.
    classes = {n: dataclasses.replace(c, window=(0.0, 24.0), session_s=1e9, gap_s=1.0, dropout=0.0, overhead_s=1.0)
               for n, c in load_classes().items()}
    population = PopulationConfig(devices=8, mix={"laptop": 1.0}, gpu_nodes={}, seed=0)
    sim = Simulation(SimConfig(population=population, max_versions=2, eval_every=2, eval_batches=1, baseline=False),
                     fed, classes)
    saboteurs = {d.id: Saboteur(how, sim) for d, how in zip(sim.devices, MALFORMED)}
    store, get, put = sim.feedback, sim.feedback.get, sim.feedback.put  # the devices' encoders
    store.get = lambda device: saboteurs.get(device) or get(device)
    store.put = lambda device, ef: None if device in saboteurs else put(device, ef)
    r = sim.run()
    assert r.counters.accepted >= 4 and r.counters.refused >= len(MALFORMED)
    # The server: a laptop joins, takes a task and sends the same four uploads over HTTP.
    (tmp_path / "s").mkdir()
    with running_server(tmp_path / "s", FED) as (url, state):
        caps = {**dataclasses.asdict(LAPTOP), "runtimes": ["torch"]}
        status, me = call(url + "/v1/join", "POST",
                          msgpack.packb({"join_token": create_token(state, "device"), "capabilities": caps}))
        assert status == 200 and me["tier"] == "laptop"
        status, answer = call(url + "/v1/task?wait=1", token=me["token"])
        task = Task.from_dict(answer["task"])
        reasons = {}
        for how in MALFORMED:
            status, reasons[how] = call(url + f"/v1/updates/{task.task_id}", "POST", malformed(how, task), me["token"])
            assert status == 422, (how, status, reasons[how])
    assert set(r.refusals) == set(reasons.values()), (r.refusals, reasons)
