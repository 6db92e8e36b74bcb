"""Scheduler: tiers from declared memory, steps from declared compute, the global step
counter, idempotent re-polls, concurrency caps and deadlines — with a virtual clock."""

from dataclasses import replace

import pytest

from stamen.core.errors import UserError
from stamen.core.model import PRESETS
from stamen.core.plan import rotating_windows, window_plan
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
    costs = {t: s.plans[t][0].cost(CFG, fed.tiers[t].batch_size, fed.training.seq_len).memory_bytes
             for t in s.plans}
    assert s.register("a", caps(mem=costs["phone-low"])).tier == "phone-low"
    assert s.register("b", caps(mem=costs["phone-high"] + 1)).tier == "phone-high"
    assert s.register("c", caps(mem=costs["laptop"])).tier == "laptop"
    assert s.register("d", caps(mem=10**12)).tier == "jetson"  # the gpu tier is for gpu nodes
    g = s.register("g", caps(role="gpu", mem=1))
    assert g.tier == "gpu" and g.plan.train == ("*",) and g.plan.blocks == (0, 1, 2, 3)
    with pytest.raises(UserError, match="no device tier fits"):
        s.register("e", caps(mem=costs["phone-low"] - 1))


def step_flops(s, fed, tier):
    t = fed.tiers[tier]
    return s.plans[tier][0].cost(CFG, t.batch_size, fed.training.seq_len).flops_per_token * t.batch_size * fed.training.seq_len


def test_steps_fit_compute_share_of_the_deadline():
    fed = load_config()
    s = Scheduler(CFG, fed)
    a = s.register("slow", caps(mem=10**12, flops=1.0))
    assert a.tier == "phone-low"  # no tier's full steps fit: the smallest, cut to one step
    assert s.next_task("slow", 0, now=0.0).steps == 1
    budget = fed.scheduler.compute_share * fed.scheduler.task_deadline_s
    m = s.register("mid", caps(mem=10**12, flops=step_flops(s, fed, "phone-low") * 5.5 / budget))
    assert m.tier == "phone-low" and s.next_task("mid", 0, now=0.0).steps == 5


def test_hardware_class_and_time_cap_the_tier():
    fed = load_config()
    s = Scheduler(CFG, fed)
    big = 10**12  # gpt-tiny fits every tier many times over: memory alone would give all jetson
    for cls in ("phone-low", "phone-high", "laptop", "jetson"):
        assert s.tier_for(Capabilities("device", big, 1e12, device_class=cls)) == cls
    assert s.tier_for(Capabilities("device", big, 1e12, device_class="")) == "jetson"  # unknown: no cap
    assert s.tier_for(Capabilities("device", big, 1e12, device_class="gpu")) == "jetson"
    laptop_mem = s.plans["laptop"][0].cost(CFG, fed.tiers["laptop"].batch_size, fed.training.seq_len).memory_bytes
    assert s.tier_for(Capabilities("device", laptop_mem, 1e12, device_class="jetson")) == "laptop"  # memory caps too
    # Compute for exactly the laptop tier's full steps in the budget, not the jetson's: laptop.
    budget = fed.scheduler.compute_share * fed.scheduler.task_deadline_s
    flops = step_flops(s, fed, "laptop") * fed.tiers["laptop"].steps / budget
    assert step_flops(s, fed, "jetson") * fed.tiers["jetson"].steps > flops * budget
    assert s.tier_for(Capabilities("device", big, flops * 1.0001, device_class="jetson")) == "laptop"
    with pytest.raises(UserError, match="device_class must be a string"):
        s.tier_for(Capabilities("device", big, 1e12, device_class=3))


def test_tiers_of_equal_size_keep_each_class_in_its_own(tmp_path):
    """Window plans of one size in every device tier: each class still gets its own tier (its
    steps, batch and codec), not the last tier of the table."""
    f = tmp_path / "fed.toml"
    f.write_text("".join(f"[tiers.{t}]\nwindow = 1\n" for t in ("phone-low", "phone-high", "laptop", "jetson")))
    s = Scheduler(CFG, load_config(f))
    for cls in ("phone-low", "phone-high", "laptop", "jetson"):
        assert s.tier_for(Capabilities("device", 10**12, 1e12, device_class=cls)) == cls
    assert s.tier_for(Capabilities("device", 10**12, 1e12, device_class="")) == "jetson"


def test_a_rotating_tier_rolls_its_window_by_version(tmp_path):
    """FedRolex: every task issued at one version takes the same window, the next version the
    next one, starting at the seed's, while no GPU node is registered; the tier costs its
    dearest window (a device must fit all)."""
    f = tmp_path / "fed.toml"
    f.write_text("[tiers.laptop]\nwindow = 2\nrotate = true\n")
    fed = load_config(f)
    s = Scheduler(CFG, fed, seed=5)
    windows = rotating_windows(CFG, "laptop", 2)
    assert s.plans["laptop"] == windows
    for c in "ab":
        s.register(c, Capabilities("device", 64 * MiB, 1e12, device_class="laptop"))
    got = []
    for version in range(4):
        tasks = [s.next_task(c, version, now=float(version)) for c in "ab"]
        assert tasks[0].plan == tasks[1].plan
        got.append(tasks[0].plan)
        for t in tasks:
            s.complete(t.task_id)
    assert got == [windows[(5 + v) % 3] for v in range(4)]
    # With a GPU node in the federation its tasks take the top window, the top-window plan's.
    s.register("node", caps(role="gpu"))
    tops = [s.next_task(c, 4 + i, now=4.0 + i) for i, c in enumerate("ab")]
    assert [t.plan for t in tops] == [windows[-1]] * 2 and windows[-1].hash == window_plan(CFG, "laptop", 2).hash
    costs = [w.cost(CFG, fed.tiers["laptop"].batch_size, fed.training.seq_len) for w in windows]
    want = max(c.memory_bytes for c in costs)
    assert want > min(c.memory_bytes for c in costs)  # the bottom window trains the embeddings too
    assert s.tier_for(Capabilities("device", want, 1e12, device_class="laptop")) == "laptop"
    assert s.tier_for(Capabilities("device", want - 1, 1e12, device_class="laptop")) != "laptop"


def test_capabilities_wire_dict_is_tolerant():
    c = Capabilities("device", 1 << 30, 1e9, ("ort",), device_class="phone-high")
    assert Capabilities.from_dict(c.to_dict()) == c
    old = {"role": "device", "memory_bytes": 1 << 30, "flops": 1e9}  # a client from before device_class
    assert Capabilities.from_dict(old).device_class == ""
    assert Capabilities.from_dict({**old, "battery": 0.5}) == Capabilities("device", 1 << 30, 1e9)


def test_abandoned_task_gives_fresh_work():
    fed = load_config()
    s = Scheduler(CFG, fed)
    s.register("a", caps())
    stale = s.next_task("a", 0, now=0.0)
    assert s.next_task("a", 5, now=1.0) == stale  # held until done, lapsed or abandoned
    assert s.abandon(stale.task_id) == stale and s.abandon(stale.task_id) is None
    fresh = s.next_task("a", 5, now=2.0)
    assert fresh.task_id != stale.task_id and fresh.base_version == 5
    s.complete(fresh.task_id)
    assert s.published() == fresh.steps  # the abandoned task's steps never counted


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


def test_global_step_runs_on_the_nodes_work():
    # Three GPU nodes and a device. Each accepted node update adds steps / 3 (a round of the
    # three nodes is one task's steps, as DiLoCo counts), fractions carried to the next
    # publish; a version the device alone publishes does not move the counter.
    fed = load_config()
    s = Scheduler(CFG, fed)
    for g in "abc":
        s.register(g, caps(role="gpu"))
    s.register("d", caps(mem=10**12))
    steps = fed.tiers["gpu"].steps
    expect, carry = 0, 0.0
    for version, merged in enumerate(["a", "d", "bc", "ad", "bc"]):
        done = [s.next_task(c, version, now=float(version)) for c in merged]
        for t in done:
            s.complete(t.task_id)
        carry += sum(t.steps for t in done if t.client_id != "d") / 3
        expect, carry = expect + int(carry), carry - int(carry)
        assert s.published() == expect, merged
    assert expect == 2 * steps  # six node updates: two rounds of the three nodes
    assert s.next_task("d", 5, now=9.0).step_offset == 2 * steps


def paced(buffer_k=2):
    fed = load_config()
    return replace(fed, aggregation=replace(fed.aggregation, buffer_k=buffer_k, paced_by=("gpu",)))


def test_a_paced_node_waits_for_its_peers_update_to_publish():
    # Two paced nodes and a device: the first node back gets nothing while the other trains at
    # this version (its next task would start from the version about to be replaced), the
    # device is not held, and after the publish both nodes train from the new version.
    s = Scheduler(CFG, paced())
    for g in "ab":
        s.register(g, caps(role="gpu"))
    s.register("d", caps(mem=10**12))
    ta, tb = s.next_task("a", 0, now=0.0), s.next_task("b", 0, now=0.0)
    s.complete(ta.task_id)
    assert s.next_task("a", 0, now=1.0) is None
    td = s.next_task("d", 0, now=1.0)
    s.complete(td.task_id)
    assert s.next_task("d", 0, now=2.0) is not None  # devices are never held for a flush
    s.complete(tb.task_id)
    s.published()
    assert s.next_task("a", 1, now=3.0).base_version == s.next_task("b", 1, now=3.0).base_version == 1


def test_a_paced_node_with_no_peer_training_is_not_held():
    # Its peer's task lapsed (or the peer holds one of an older version, whose update cannot
    # publish this one alone): nothing else would publish, so the node trains on.
    s = Scheduler(CFG, paced())
    for g in "ab":
        s.register(g, caps(role="gpu"))
    ta, tb = s.next_task("a", 0, now=0.0), s.next_task("b", 0, now=0.0)
    s.complete(ta.task_id)
    assert s.next_task("a", 0, now=1.0) is None
    assert s.abandon(tb.task_id) == tb
    assert s.next_task("a", 0, now=2.0).base_version == 0


def test_without_pacing_a_node_gets_its_next_task_at_once():
    s = Scheduler(CFG, load_config())  # FedBuff: paced_by empty
    for g in "ab":
        s.register(g, caps(role="gpu"))
    ta, _ = s.next_task("a", 0, now=0.0), s.next_task("b", 0, now=0.0)
    s.complete(ta.task_id)
    assert s.next_task("a", 0, now=1.0).base_version == 0


def test_a_restart_with_two_open_tasks_of_one_client_holds_the_newer():
    fed = load_config()
    s = Scheduler(CFG, fed)
    s.register("a", caps())
    older = s.next_task("a", 0, now=0.0)
    s.abandon(older.task_id)  # in memory only: the ledger still has it open
    newer = s.next_task("a", 1, now=1.0)
    restarted = Scheduler(CFG, fed, next_seq=0)
    for task in (older, newer):  # the ledger's order
        restarted.restore_task(task)
    restarted.register("a", caps())
    assert restarted.next_task("a", 1, now=2.0) == newer  # the re-poll gets the task it works on
    restarted.complete(older.task_id)  # the older one's update may still arrive and count
    assert restarted.next_task("a", 1, now=3.0) == newer  # and is still held, not a third task
    assert restarted.next_seq == int(newer.task_id[1:]) + 1


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


def test_a_device_back_with_its_update_yields_to_the_devices_refused_meanwhile():
    """With the cap reached, b is refused; a, back with its update, does not take the place it
    freed while b may still be long-polling (within long_poll_s), so b gets it. Without a
    refusal in that time, or once a long poll has passed, a device takes its next task at once."""
    fed = load_config()
    object.__setattr__(fed.scheduler, "max_in_flight", 1)
    wait = fed.server.long_poll_s
    s = Scheduler(CFG, fed)
    for c in "abc":
        s.register(c, caps())
    ta = s.next_task("a", 0, now=0.0)
    assert s.next_task("b", 0, now=1.0) is None  # the cap
    s.complete(ta.task_id, now=2.0)
    assert s.next_task("a", 0, now=2.0) is None  # a yields
    tb = s.next_task("b", 0, now=3.0)
    assert tb is not None
    s.complete(tb.task_id, now=4.0 + wait)  # no refusal for a long poll: b goes on
    assert s.next_task("b", 0, now=4.0 + wait) is not None
    assert s.next_task("a", 0, now=5.0 + wait) is None  # the cap again: a refused
    s.complete(s.held("b").task_id, now=6.0 + wait)
    assert s.next_task("b", 0, now=6.0 + wait) is None  # b yields to a
    assert s.next_task("c", 0, now=7.0 + wait) is not None  # never refused, never served: c may take it


def test_devices_alone_take_their_own_cap_and_lr(tmp_path):
    """While no GPU node is registered, device tasks are capped at max_in_flight_alone and
    train at their tier's lr_alone; once a node registers, at max_in_flight and lr; a tier
    without lr_alone keeps lr either way."""
    f = tmp_path / "fed.toml"
    f.write_text("[scheduler]\nmax_in_flight = 3\nmax_in_flight_alone = 2\n"
                 "[tiers.laptop]\nlr = 1e-3\nlr_alone = 5e-3\n[tiers.jetson]\nlr = 2e-3\n")
    s = Scheduler(CFG, load_config(f))
    for c, cls in zip("abcd", ("laptop", "laptop", "jetson", "jetson")):
        s.register(c, Capabilities("device", 10**12, 1e12, device_class=cls))
    alone = [s.next_task(c, 0, now=0.0) for c in "abc"]
    assert alone[2] is None  # two out: the cap alone
    assert [t.train.lr for t in alone[:2]] == [5e-3, 5e-3]
    s.register("g", caps(role="gpu"))
    beside = [s.next_task(c, 0, now=0.0) for c in "cd"]
    assert beside[1] is None  # three out: max_in_flight
    assert beside[0].train.lr == 2e-3
    for t in alone:
        if t is not None:
            s.complete(t.task_id)
    assert s.next_task("a", 1, now=1.0).train.lr == 1e-3


def test_cap_counts_device_tasks_only():
    fed = load_config()
    s = Scheduler(CFG, fed)
    object.__setattr__(fed.scheduler, "max_in_flight", 1)
    s.register("a", caps())
    s.register("b", caps())
    s.register("g", caps(role="gpu"))
    assert s.next_task("g", 0, now=0.0) is not None
    assert s.next_task("a", 0, now=0.0) is not None  # the gpu node's task takes no device slot
    assert s.next_task("b", 0, now=0.0) is None
    s.register("h", caps(role="gpu"))
    assert s.next_task("h", 0, now=0.0) is not None  # devices queueing never starve a gpu node
