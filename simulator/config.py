"""The simulation config: the packaged ``simulation.toml`` holds every default (with comments
that say what each does) and a user's file overrides only what it names. Read once into frozen
dataclasses, so a typo stops ``stamen simulate`` with one line before any work is done."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from stamen.core.errors import UserError
from stamen.server.config import FederationConfig, load_config
from stamen.simulator.engine import SimConfig
from stamen.simulator.profiles import HardwareClass, PopulationConfig, load_classes
from stamen.simulator.ray_backend import check_backend

_POPULATION_KEYS = ("devices", "jitter", "timezone_spread_h")


@dataclass(frozen=True)
class SimSetup:
    """Everything a simulation reads: its own settings, the federation's, the hardware."""

    sim: SimConfig
    fed: FederationConfig
    classes: dict[str, HardwareClass]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"simulation config not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"simulation config {path}: {e}") from None


def _merge(data: dict[str, Any], user: dict[str, Any]) -> None:
    for section, values in user.items():
        if section not in data or not isinstance(values, dict):
            raise UserError(f"simulation config: unknown section or not a table: [{section}] (known: {', '.join(data)})")
        for key, value in values.items():
            if key not in data[section]:
                raise UserError(f"simulation config [{section}]: unknown key {key!r} (known: {', '.join(data[section])})")
            data[section][key] = value


def _typed(where: str, value: Any, default: Any) -> Any:
    """``value`` if it has the default's type (an int is fine where a float is expected)."""
    kind = type(default)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise UserError(f"simulation config {where}: {value!r} should be of type {kind.__name__}")
    return value


def _table(where: str, table: Any, kind: type) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UserError(f"simulation config {where} must be a table")
    out = {}
    for k, v in table.items():
        out[k] = _typed(f"{where} {k}", v, kind(0))
    return out


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
        _merge(data, _read(p))
        base = p.parent
    s, pop = data["simulation"], data["population"]
    defaults = SimConfig()
    known = {f.name for f in fields(SimConfig)} - {"population"}
    sim = SimConfig(**{k: _typed(f"[simulation] {k}", s[k], getattr(defaults, k)) for k in known})
    population = PopulationConfig(
        **{k: _typed(f"[population] {k}", pop[k], getattr(PopulationConfig(), k)) for k in _POPULATION_KEYS},
        mix=_table("[population.mix]", pop["mix"], float), gpu_nodes=_table("[population.gpu_nodes]", pop["gpu_nodes"], int),
        seed=sim.seed)
    sim = replace(sim, population=population)
    if sim.horizon_h <= 0 or sim.max_versions < 1 or sim.eval_every < 1 or sim.eval_batches < 1 or sim.max_group < 1:
        raise UserError("simulation config [simulation]: horizon_h, max_versions, eval_every, eval_batches "
                        "and max_group must be positive")
    check_backend(sim.backend, sim.address)
    fed_file = _resolve(_typed("[federation] file", data["federation"]["file"], ""), base)
    if fed_file is None:
        with resources.as_file(resources.files("stamen.simulator").joinpath("federation.toml")) as f:
            fed = load_config(f)
    else:
        fed = load_config(fed_file)
    classes = load_classes(_resolve(_typed("[population] profiles", pop["profiles"], ""), base))
    population.check(classes)
    return SimSetup(sim, fed, classes)
