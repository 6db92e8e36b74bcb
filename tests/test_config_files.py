"""The packaged TOML files and the settings dataclasses name the same keys with the same
defaults, so a default lives in one place and the file documents it truly; and one loader
(``core.config.from_table``) reads them all with one-line errors."""

import tomllib
from importlib import resources

import pytest

from stamen.core.config import defaults, from_table
from stamen.core.errors import UserError
from stamen.server.config import SECTIONS, TierSettings
from stamen.simulator.attackers import AttackConfig
from stamen.simulator.engine import SimConfig
from stamen.simulator.profiles import ClassSettings, PopulationConfig


def packaged(package: str, name: str) -> dict:
    return tomllib.loads(resources.files(package).joinpath(name).read_text())


def test_federation_toml_matches_the_dataclasses():
    data = packaged("stamen.server", "federation.toml")
    assert set(data) == set(SECTIONS) | {"tiers"}
    for name, cls in SECTIONS.items():
        # Same keys, same values (1 == 1.0 in TOML floats); TOML has no null, so a field whose
        # default is None is set only by naming it (the file documents it in a comment).
        expected = {k: v for k, v in defaults(cls).items() if v is not None}
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in data[name].items()} == expected, name
    required = {k for k in TierSettings.__dataclass_fields__} - set(defaults(TierSettings))
    for tier, table in data["tiers"].items():
        assert required <= set(table) <= set(TierSettings.__dataclass_fields__), tier


def test_simulator_federation_toml_names_only_known_keys():
    data = packaged("stamen.simulator", "federation.toml")
    for name, table in data.items():
        if name == "tiers":
            assert all(set(t) <= set(TierSettings.__dataclass_fields__) for t in table.values())
        else:
            assert set(table) <= set(defaults(SECTIONS[name])), name


def test_simulation_toml_matches_the_dataclasses():
    data = packaged("stamen.simulator", "simulation.toml")
    assert data["simulation"] == {k: v for k, v in defaults(SimConfig).items() if k not in ("population", "attack")}
    assert data["population"]["attackers"] == defaults(AttackConfig)
    population = {k: v for k, v in data["population"].items() if k not in ("profiles", "attackers")}
    assert population == {k: v for k, v in defaults(PopulationConfig).items() if k != "seed"}


def test_profiles_toml_names_every_class_setting():
    for name, table in packaged("stamen.simulator", "profiles.toml").items():
        assert set(table) == set(ClassSettings.__dataclass_fields__), name


@pytest.mark.parametrize("table, message", [
    ({"buffer_k": 2, "bufer_k": 3}, "unknown key 'bufer_k'"),
    ({"buffer_k": True}, "buffer_k: True has the wrong type"),
    ({"outer_lr": -1.0}, "outer lr must be positive"),
])
def test_one_loader_one_line_errors(table, message):
    with pytest.raises(UserError, match=message) as e:
        from_table(SECTIONS["aggregation"], table, "[aggregation]")
    assert str(e.value).startswith("[aggregation]") and "\n" not in str(e.value)
    assert from_table(SECTIONS["aggregation"], {"outer_lr": 1}, "[aggregation]").outer_lr == 1.0
