"""The simulation config: the packaged ``simulation.toml`` holds every default (with comments
that say what each does) and a user's file overrides only what it names. Read once into frozen
dataclasses, so a typo stops ``stamen simulate`` with one line before any work is done."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from stamen.core.config import from_table, read_toml
from stamen.core.errors import UserError
from stamen.server.config import FederationConfig, load_config
from stamen.simulator.attackers import AttackConfig
from stamen.simulator.engine import TEXT_MODES, SimConfig
from stamen.simulator.profiles import HardwareClass, PopulationConfig, load_classes
from stamen.simulator.ray_backend import check_backend

@dataclass(frozen=True)
class SimSetup:
    """Everything a simulation reads: its own settings, the federation's, the hardware."""

    sim: SimConfig
    fed: FederationConfig
    classes: dict[str, HardwareClass]


def _merge(data: dict[str, Any], user: dict[str, Any]) -> None:
    for section, values in user.items():
        if section not in data or not isinstance(values, dict):
            raise UserError(f"simulation config: unknown section or not a table: [{section}] (known: {', '.join(data)})")
        for key, value in values.items():
            if key not in data[section]:
                raise UserError(f"simulation config [{section}]: unknown key {key!r} (known: {', '.join(data[section])})")
            data[section][key] = value


def _resolve(name: str, base: Path | None) -> Path | None:
    """A path named in a config file is relative to that file's folder; "" means none."""
    if not name:
        return None
    p = Path(name)
    return p if p.is_absolute() or base is None else base / p


def load_simulation(path: str | Path | None = None) -> SimSetup:
    """The defaults, overridden key by key by the file at ``path`` (if any)."""
    data = tomllib.loads(resources.files("stamen.simulator").joinpath("simulation.toml").read_text())
    base = None
    if path is not None:
        p = Path(path)
        _merge(data, read_toml(p, "simulation config"))
        base = p.parent
    s, pop = data["simulation"], dict(data["population"])
    profiles = pop.pop("profiles")
    attack = from_table(AttackConfig, pop.pop("attackers"), "simulation config [population.attackers]")
    sim = from_table(SimConfig, s, "simulation config [simulation]", skip=("population", "attack"))
    population = replace(from_table(PopulationConfig, pop, "simulation config [population]", skip=("seed",)),
                         seed=sim.seed)
    sim = replace(sim, population=population, attack=attack)
    if sim.horizon_h <= 0 or sim.max_versions < 1 or sim.eval_every < 1 or sim.eval_batches < 1 or sim.max_group < 1:
        raise UserError("simulation config [simulation]: horizon_h, max_versions, eval_every, eval_batches "
                        "and max_group must be positive")
    if sim.text not in TEXT_MODES:
        raise UserError(f"simulation config [simulation]: unknown text mode {sim.text!r}: use one of {', '.join(TEXT_MODES)}")
    if not 0 < sim.public_share < 1:
        raise UserError(f"simulation config [simulation]: public share must be in (0, 1), got {sim.public_share}")
    check_backend(sim.backend, sim.address)
    if not isinstance(data["federation"]["file"], str):
        raise UserError(f"simulation config [federation] file: {data['federation']['file']!r} should be a path (a string)")
    fed_file = _resolve(data["federation"]["file"], base)
    if fed_file is None:
        with resources.as_file(resources.files("stamen.simulator").joinpath("federation.toml")) as f:
            fed = load_config(f)
    else:
        fed = load_config(fed_file)
    if not isinstance(profiles, str):
        raise UserError(f"simulation config [population] profiles: {profiles!r} should be a path (a string)")
    classes = load_classes(_resolve(profiles, base))
    population.check(classes)
    return SimSetup(sim, fed, classes)
