"""The Ray backend trains the same groups as the in-process one, bit for bit: a simulation gives
the same summary.json on either (local Ray). The driver runs torch single-threaded (conftest), as
each Ray worker does, so both sum in the same order."""

import dataclasses
import json

import pytest
import torch

from stamen.core.data import partition
from stamen.core.errors import UserError
from stamen.core.model import GPT, ModelSpec, weights
from stamen.core.plan import Plan
from stamen.core.train import TrainConfig
from stamen.simulator.config import load_simulation
from stamen.simulator.ray_backend import GroupWork, LocalBackend, RayBackend
from stamen.simulator.run import simulate

SIM_TOML = """
[simulation]
max_versions = 4
eval_every = 2
eval_batches = 1
baseline = false
max_group = 8
[population]
devices = 40
[population.mix]
jetson = 0.5
laptop = 0.5
[population.gpu_nodes]
[federation]
file = "fed.toml"
"""
FED_TOML = """
[aggregation]
buffer_k = 6
tau_max = 3
[training]
seq_len = 32
[tiers.jetson]
steps = 2
batch_size = 2
[tiers.laptop]
steps = 3
batch_size = 2
"""
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    (d / "sim.toml").write_text(SIM_TOML)
    (d / "fed.toml").write_text(FED_TOML)
    return load_simulation(d / "sim.toml")


def test_ray_summary_equals_local(setup, tmp_path):
    local = simulate(setup, tmp_path / "local", progress=False)
    on_ray = simulate(dataclasses.replace(setup, sim=dataclasses.replace(setup.sim, backend="ray")),
                      tmp_path / "ray", progress=False)
    assert on_ray["config"]["simulation"].pop("backend") == "ray"
    assert local["config"]["simulation"].pop("backend") == "local"
    assert json.dumps(on_ray) == json.dumps(local)
    assert local["versions"] == 4 and local["counters"]["accepted"] >= 24
    assert len(local["per_tier"]) == 2, "both tiers' groups trained"
    # The report's own file, byte for byte, apart from the backend's name.
    files = [(tmp_path / run / "summary.json").read_text() for run in ("local", "ray")]
    assert files[1].replace('"backend": "ray"', '"backend": "local"') == files[0]


def test_a_group_trains_the_same_on_a_ray_worker(stdlib):
    """Across chunks of max_group devices, each device's tensors and losses equal in-process ones."""
    corpus, train, _ = stdlib
    shards = partition(train, 5, "iid", seed=0, seq_len=16)
    model_cfg = ModelSpec("gpt-tiny").gpt_config()
    plan = Plan("half", blocks=(0,), width=0.5)
    torch.manual_seed(0)
    base = plan.extract(weights(GPT(model_cfg)), model_cfg)
    work = GroupWork(model_cfg, plan, base, [s.ranges for s in shards], [11, 12, 13, 14, 15], batch_size=2,
                     seq_len=16, steps=2, train=TrainConfig(lr=1e-2), step_offset=3, max_group=2)
    ray_backend = RayBackend(corpus, num_cpus=2)
    try:
        remote = ray_backend.result(ray_backend.submit(work))
    finally:
        ray_backend.close()
    here = LocalBackend(corpus).result(work)
    assert [r.losses.shape[0] for r in here] == [2, 2, 1]
    for a, b in zip(here, remote, strict=True):
        assert a.tokens == b.tokens == 2 * 2 * 16
        assert torch.equal(a.losses, b.losses)
        assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


@pytest.mark.parametrize("extra, reason", [('backend = "spark"', "unknown simulation backend"),
                                           ('address = "head:6379"', "needs backend")])
def test_bad_backend_settings_are_one_line_errors(tmp_path, extra, reason):
    (tmp_path / "sim.toml").write_text(f"[simulation]\n{extra}\n")
    with pytest.raises(UserError, match=reason):
        load_simulation(tmp_path / "sim.toml")


@pytest.mark.parametrize("address, reason", [("head", "HOST:PORT"), ("127.0.0.1:9", "cannot reach")])
def test_a_ray_address_that_cannot_work_is_refused_at_once(stdlib, address, reason):
    with pytest.raises(UserError, match=reason):
        RayBackend(stdlib[0], address)
