"""The simulation TOML: packaged defaults, key-by-key overrides, one-line errors."""

import pytest

from stamen.core.errors import UserError
from stamen.simulator.config import load_simulation


def test_defaults_are_the_issue_default():
    s = load_simulation()
    pop = s.sim.population
    assert s.sim.model == "gpt-tiny" and s.sim.partition == "natural" and s.sim.data == "stdlib"
    assert pop.devices == 1000 and pop.gpu_nodes == {"gpu-h100": 2} and sum(pop.mix.values()) == pytest.approx(1.0)
    assert s.fed.aggregation.buffer_k == 2 and s.fed.aggregation.paced_by == ("gpu",)  # simulator/federation.toml
    assert s.fed.tiers["gpu"].steps == 10
    assert s.fed.scheduler.max_in_flight == 30
    assert s.fed.tiers["phone-low"].codec == "topk(0.05)+int8+zstd(3)"  # the server's default underneath
    assert set(s.classes) >= set(pop.mix) | set(pop.gpu_nodes)


def test_overrides_key_by_key(tmp_path):
    (tmp_path / "fed.toml").write_text("[aggregation]\nbuffer_k = 3\n")
    cfg = tmp_path / "sim.toml"
    cfg.write_text('[simulation]\nseed = 7\nhorizon_h = 2\n[population]\ndevices = 50\n'
                   '[population.mix]\nlaptop = 1\n[federation]\nfile = "fed.toml"\n')
    s = load_simulation(cfg)
    assert s.sim.seed == 7 and s.sim.population.seed == 7 and s.sim.horizon_h == 2.0
    assert s.sim.population.mix == {"laptop": 1.0} and s.sim.population.gpu_nodes == {"gpu-h100": 2}
    assert s.sim.max_versions == 40  # untouched default
    assert s.fed.aggregation.buffer_k == 3  # relative to the config's folder


@pytest.mark.parametrize("text, message", [
    ("[simulaton]\nseed = 1\n", "unknown section"),
    ("[simulation]\nsed = 1\n", "unknown key 'sed'"),
    ('[simulation]\nseed = "one"\n', r"\[simulation\] seed: 'one' has the wrong type \(expected int\)"),
    ("[simulation]\nmax_versions = 0\n", "must be positive"),
    ("[population.mix]\ntoaster = 1\n", "unknown hardware classes"),
    ('[federation]\nfile = "nowhere.toml"\n', "not found"),
    ("[simulation\n", "simulation config"),
])
def test_bad_config_is_one_user_error(tmp_path, text, message):
    cfg = tmp_path / "sim.toml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message):
        load_simulation(cfg)


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_simulation("/nonexistent/sim.toml")
