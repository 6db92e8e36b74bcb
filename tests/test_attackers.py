"""The simulator's attackers: a seeded draw of devices, and each kind's forged update exactly."""

import pytest
import torch

from stamen.core.errors import UserError
from stamen.simulator.attackers import AttackConfig, Attackers
from stamen.simulator.config import load_simulation


def test_the_draw_is_seeded_and_sized():
    ids = list(range(100))
    a, b = Attackers(AttackConfig(0.2), ids, seed=3), Attackers(AttackConfig(0.2), ids, seed=3)
    assert len(a.ids) == 20 and a.ids == b.ids and a.ids != Attackers(AttackConfig(0.2), ids, seed=4).ids
    assert not Attackers(AttackConfig(0.0), ids, seed=3).ids


def test_each_kind_forges_what_it_says():
    d = {"w": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.0, 0.0])}  # RMS over 4 elements: 2.5
    forge = lambda kind, dev=1, plan="p", version=0, delta=d: Attackers(  # noqa: E731
        AttackConfig(0.5, kind, scale=2.0), [1, 2], seed=0).forge(dev, plan, version, delta)
    assert torch.equal(forge("scaled")["w"], torch.tensor([6.0, -8.0]))
    assert torch.equal(forge("signflip")["w"], torch.tensor([-6.0, 8.0]))
    assert torch.equal(forge("constant")["b"], torch.tensor([5.0, 5.0]))
    noise = forge("noise")
    assert noise["w"].shape == (2,) and not torch.equal(noise["w"], d["w"])
    r = Attackers(AttackConfig(0.5, "replay"), [1, 2], seed=0)
    first = r.forge(1, "p", 0, d)
    assert r.forge(1, "p", 5, {n: t + 1 for n, t in d.items()}) is first  # the first update, again
    s = Attackers(AttackConfig(0.5, "sybil", scale=2.0), [1, 2], seed=0)
    shared = s.forge(1, "p", 3, d)
    assert s.forge(2, "p", 3, {n: t * 0 for n, t in d.items()}) is shared  # colluders send one update
    assert torch.equal(shared["w"], torch.tensor([-6.0, 8.0]))


def test_config_reads_and_checks_attackers(tmp_path):
    (tmp_path / "sim.toml").write_text('[population.attackers]\nfraction = 0.1\nkind = "sybil"\n')
    attack = load_simulation(tmp_path / "sim.toml").sim.attack
    assert attack == AttackConfig(0.1, "sybil", 10.0)
    (tmp_path / "bad.toml").write_text('[population.attackers]\nkind = "bribe"\n')
    with pytest.raises(UserError, match="kind 'bribe'"):
        load_simulation(tmp_path / "bad.toml")
