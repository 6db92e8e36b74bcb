"""Hardware classes and seeded populations of virtual devices."""

import math

import numpy as np
import pytest

from stamen.core.errors import UserError
from stamen.simulator.profiles import HOUR, PopulationConfig, VirtualDevice, load_classes, sample_population


@pytest.fixture(scope="module")
def classes():
    return load_classes()


def test_packaged_classes_in_si_units(classes):
    assert set(classes) == {"phone-low", "phone-high", "laptop", "jetson", "gpu-a100", "gpu-h100"}
    low = classes["phone-low"]
    assert low.up_bytes_s == 5e6 / 8 and low.down_bytes_s == 20e6 / 8
    assert low.memory_bytes == 256 * 2**20 and low.session_s == 3600 and low.window == (22.0, 7.0)
    assert classes["gpu-h100"].role == "gpu" and classes["laptop"].role == "device"
    # Orders of magnitude between the classes are the point of the table.
    assert classes["gpu-h100"].flops / classes["phone-low"].flops > 1e4


def test_population_exact_counts_and_deterministic(classes):
    cfg = PopulationConfig(devices=1001, seed=3)
    pop = sample_population(classes, cfg)
    kinds = [d.hardware for d in pop]
    # 40/30/20/10 % of 1001 is 400.4/300.3/200.2/100.1: the one left over goes to the largest
    # remainder; the two GPU nodes come last.
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "phone-low": 401, "phone-high": 300, "laptop": 200, "jetson": 100, "gpu-h100": 2}
    assert kinds[-2:] == ["gpu-h100", "gpu-h100"] and [d.id for d in pop] == list(range(1003))
    assert pop == sample_population(classes, cfg)
    assert pop != sample_population(classes, PopulationConfig(devices=1001, seed=4))


def test_jitter_spreads_around_the_class_figure(classes):
    exact = sample_population(classes, PopulationConfig(devices=50, jitter=0.0))
    assert all(d.capabilities.flops == classes[d.hardware].flops for d in exact)
    pop = sample_population(classes, PopulationConfig(devices=4000, jitter=0.3, gpu_nodes={}))
    ratio = np.array([d.capabilities.flops / classes[d.hardware].flops for d in pop])
    assert abs(np.median(ratio) - 1) < 0.03 and abs(np.log(ratio).std() - 0.3) < 0.02
    assert all(d.capabilities.memory_bytes == classes[d.hardware].memory_bytes for d in pop)
    tz = np.array([d.tz_offset_h for d in pop])
    assert tz.min() >= -4 and tz.max() <= 4 and tz.max() - tz.min() > 7.9


def _device(window, tz=0.0, session_s=1800.0, gap_s=600.0) -> VirtualDevice:
    classes = load_classes()
    caps = sample_population(classes, PopulationConfig(devices=1, mix={"phone-low": 1}, gpu_nodes={}))[0].capabilities
    return VirtualDevice(0, "phone-low", caps, tz, window, session_s, gap_s, 0.1, 2.0)


def test_window_wraps_midnight_and_follows_time_zone():
    night = _device((22.0, 7.0))
    assert night.window_at(23 * HOUR) == (22 * HOUR, 31 * HOUR)
    assert night.window_at(12 * HOUR) == (22 * HOUR, 31 * HOUR)
    assert night.window_at(3 * HOUR) == (-2 * HOUR, 7 * HOUR)
    assert night.window_at(31 * HOUR) == (46 * HOUR, 55 * HOUR)
    east = _device((22.0, 7.0), tz=2.0)  # local 22:00 is 20:00 UTC
    assert east.window_at(12 * HOUR) == (20 * HOUR, 29 * HOUR)
    always = _device((0.0, 24.0))
    assert always.window_at(5.0) == (5.0, math.inf)


def test_sessions_lie_inside_windows():
    dev = _device((22.0, 7.0), tz=-3.0)
    rng = np.random.default_rng(0)
    t = 0.0
    for _ in range(200):
        start, end = dev.next_session(t, rng)
        w_start, w_end = dev.window_at(start)
        assert t <= start < end <= w_end and start >= w_start
        t = end
    assert t > 5 * 24 * HOUR  # sessions keep coming, night after night


def test_first_session_starts_from_the_steady_state():
    rng = np.random.default_rng(0)
    always = _device((0.0, 24.0), session_s=1800.0, gap_s=600.0)
    starts = [always.first_session(rng)[0] for _ in range(4000)]
    assert abs(np.mean([s == 0.0 for s in starts]) - 1800 / 2400) < 0.03
    day = _device((9.0, 17.0))  # closed at midnight UTC: nobody starts before 09:00
    assert min(day.first_session(rng)[0] for _ in range(200)) >= 9 * HOUR


def test_bad_input_is_a_user_error(classes, tmp_path):
    with pytest.raises(UserError, match="unknown hardware classes"):
        sample_population(classes, PopulationConfig(mix={"toaster": 1.0}))
    with pytest.raises(UserError, match="mix fractions"):
        sample_population(classes, PopulationConfig(mix={"laptop": 0.0}))
    bad = tmp_path / "p.toml"
    bad.write_text('[x]\nrole = "device"\n')
    with pytest.raises(UserError, match="missing"):
        load_classes(bad)
    bad.write_text("[x\n")
    with pytest.raises(UserError):
        load_classes(bad)
    with pytest.raises(UserError, match="not found"):
        load_classes(tmp_path / "none.toml")


def test_gpu_nodes_are_the_same_hardware_with_or_without_devices(classes):
    def nodes(devices: int):
        pop = sample_population(classes, PopulationConfig(devices=devices, gpu_nodes={"gpu-h100": 2}, seed=3))
        return [(d.capabilities, d.tz_offset_h) for d in pop if d.capabilities.role == "gpu"]

    assert len(nodes(0)) == 2 and nodes(0) == nodes(50) == nodes(1000)
    assert nodes(0)[0] != nodes(0)[1]  # each node its own draw
