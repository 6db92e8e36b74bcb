"""Scheduler: tiers from declared memory, steps from declared compute, the global step
counter, idempotent re-polls, concurrency caps and deadlines — with a virtual clock."""

import pytest

from stamen.core.errors import UserError
from stamen.core.model import PRESETS
from stamen.core.records import Capabilities
from stamen.server.config import load_config
from stamen.server.scheduler import Scheduler

CFG = PRESETS["gpt-tiny"]
MiB = 2**20


def caps(role="device", mem=64 * MiB, flops=1e12):
    return Capabilities(role=role, memory_bytes=mem, flops=flops)


def test_tier_is_the_largest_device_plan_that_fits_memory():
    fed = load_config()
    s = Scheduler(CFG, fed)
    costs = {t: s.plans[t].cost(CFG, fed.tiers[t].batch_size, fed.training.seq_len).memory_bytes
             for t in s.plans}
    assert s.register("a", caps(mem=costs["phone-low"])).tier == "phone-low"
    assert s.register("b", caps(mem=costs["phone-high"] + 1)).tier == "phone-high"
    assert s.register("c", caps(mem=costs["laptop"])).tier == "laptop"
    assert s.register("d", caps(mem=10**12)).tier == "jetson"  # the gpu tier is for gpu nodes
    g = s.register("g", caps(role="gpu", mem=1))
    assert g.tier == "gpu" and g.plan.train == ("*",) and g.plan.blocks == (0, 1, 2, 3)
    with pytest.raises(UserError, match="no device tier fits"):
        s.register("e", caps(mem=costs["phone-low"] - 1))


def test_steps_fit_compute_share_of_the_deadline():
    fed = load_config()
    s = Scheduler(CFG, fed)
    a = s.register("slow", caps(mem=10**12, flops=1.0))
    assert s.next_task("slow", 0, now=0.0).steps == 1
    t = fed.tiers["jetson"]
    per_step = s.plans["jetson"].cost(CFG, t.batch_size, fed.training.seq_len).flops_per_token * t.batch_size * fed.training.seq_len
    budget = fed.scheduler.compute_share * fed.scheduler.task_deadline_s
    s.register("mid", caps(mem=10**12, flops=per_step * 5.5 / budget))
    assert s.next_task("mid", 0, now=0.0).steps == 5
    assert a.tier == "jetson"


def test_global_step_counter_and_tasks():
    fed = load_config()
    s = Scheduler(CFG, fed, seed=3)
    s.register("g", caps(role="gpu"))
    s.register("d", caps(mem=10**12))
    tg = s.next_task("g", 0, now=0.0)
    td = s.next_task("d", 0, now=0.0)
    assert (tg.steps, td.steps) == (fed.tiers["gpu"].steps, fed.tiers["jetson"].steps)
    assert tg.step_offset == td.step_offset == 0 and tg.task_id != td.task_id
    assert s.next_task("g", 0, now=1.0) == tg  # a re-poll returns the task it holds
    s.complete(td.task_id)
    s.complete(tg.task_id)
    assert s.published() == fed.tiers["gpu"].steps  # the most steps merged, Photon-style
    assert s.next_task("d", 1, now=2.0).step_offset == fed.tiers["gpu"].steps


def test_deadline_lapses_and_cap():
    fed = load_config()
    s = Scheduler(CFG, fed)
    object.__setattr__(fed.scheduler, "max_in_flight", 1)
    s.register("a", caps())
    s.register("b", caps())
    ta = s.next_task("a", 0, now=0.0)
    assert s.next_task("b", 0, now=1.0) is None  # cap reached
    late = ta.deadline + 1
    tb = s.next_task("b", 0, now=late)  # a's task lapsed: b gets work
    assert tb is not None and ta.task_id not in s.in_flight
    with pytest.raises(KeyError):
        s.complete(ta.task_id)
