"""Virtual devices: hardware classes (the packaged ``profiles.toml``, figures with their public
sources) and a seeded population drawn from them.

A class gives typical figures; a population says how many devices of each class take part and
how much each device differs from its class (a log-normal jitter on compute and bandwidth,
a time zone). Drawing is deterministic for a seed, so two runs simulate the same devices.
A device declares its class's name as its ``device_class``: the scheduler gives it at most the
tier of that name (phone-low, phone-high, laptop, jetson), so a tiny model that fits every
device's memory still trains on mixed plans. Memory is not jittered, so a class maps to one tier.

Availability is a diurnal window in local time inside which a device alternates online
sessions and offline gaps (both exponential); the engine asks ``next_session`` when a device
may next work and drops a task that outlasts the session.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from stamen.core.config import from_table, read_toml
from stamen.core.errors import UserError
from stamen.core.records import Capabilities

HOUR = 3600.0
DAY = 24 * HOUR
_MBPS = 1e6 / 8  # bytes per second in one megabit per second


@dataclass(frozen=True)
class ClassSettings:
    """One ``[NAME]`` table of ``profiles.toml``, in the file's units (the file's header says
    where each figure comes from); every key is required."""

    role: str
    """``device`` or ``gpu``."""
    flops: float
    """Sustained training throughput, FLOP/s."""
    memory_mb: float
    """Memory an app or job may give to training."""
    up_mbps: float
    """Upload bandwidth, megabits per second."""
    down_mbps: float
    """Download bandwidth, megabits per second."""
    runtimes: tuple[str, ...]
    """Runtimes the class declares, preferred first."""
    accelerator: str
    """E.g. ``cuda:NVIDIA H100``; "" for none."""
    cores: int
    """CPU cores."""
    window: tuple[float, float]
    """Local hours [start, end) the device volunteers (end < start wraps midnight; [0, 24]: always)."""
    session_min: float
    """Mean online session inside the window (exponential), minutes."""
    gap_min: float
    """Mean time offline between sessions (exponential), minutes."""
    dropout: float
    """Probability a task is abandoned before its upload."""
    overhead_s: float
    """Fixed time per task besides transfer and compute."""

    def __post_init__(self) -> None:
        numbers = ("flops", "memory_mb", "up_mbps", "down_mbps", "cores", "session_min", "gap_min", "dropout",
                   "overhead_s")
        bad = [k for k in numbers if getattr(self, k) < 0]
        if bad:
            raise UserError(f"{', '.join(bad)} must be non-negative")
        start, end = self.window
        if not (0 <= start <= 24 and 0 <= end <= 24 and start != end):
            raise UserError(f"window must be [start_hour, end_hour] within 0..24, got {list(self.window)} (use [0, 24] for always)")
        if self.role not in ("device", "gpu"):
            raise UserError(f"role must be 'device' or 'gpu', got {self.role!r}")
        if not self.dropout < 1 or not self.flops > 0 or not self.session_min > 0:
            raise UserError("needs flops > 0, session_min > 0 and dropout < 1")


@dataclass(frozen=True)
class HardwareClass:
    """One row of ``profiles.toml`` in SI units (FLOP/s, bytes, bytes/s, seconds)."""

    name: str
    role: str  # "device" or "gpu"
    flops: float
    memory_bytes: int
    up_bytes_s: float
    down_bytes_s: float
    runtimes: tuple[str, ...]
    accelerator: str
    cores: int
    window: tuple[float, float]  # local hours [start, end); end < start wraps midnight
    session_s: float
    gap_s: float
    dropout: float
    overhead_s: float  # per task, besides transfer and compute

    @classmethod
    def from_settings(cls, name: str, d: ClassSettings) -> "HardwareClass":
        return cls(name, d.role, d.flops, int(d.memory_mb * 2**20), d.up_mbps * _MBPS, d.down_mbps * _MBPS,
                   d.runtimes, d.accelerator, d.cores, d.window, d.session_min * 60.0, d.gap_min * 60.0,
                   d.dropout, d.overhead_s)


def load_classes(path: str | Path | None = None) -> dict[str, HardwareClass]:
    """The packaged hardware classes, or those of a user's TOML file of the same form."""
    if path is None:
        data = tomllib.loads(resources.files("stamen.simulator").joinpath("profiles.toml").read_text())
    else:
        data = read_toml(Path(path), "hardware profiles")
    return {name: HardwareClass.from_settings(name, from_table(ClassSettings, d, f"hardware class [{name}]"))
            for name, d in data.items()}


@dataclass(frozen=True)
class PopulationConfig:
    """Who takes part: ``mix`` gives fractions of ``devices`` by class (normalised),
    ``gpu_nodes`` exact counts of GPU-class nodes added on top."""

    devices: int = 1000
    mix: dict[str, float] = field(default_factory=lambda: {
        "phone-low": 0.4, "phone-high": 0.3, "laptop": 0.2, "jetson": 0.1})
    gpu_nodes: dict[str, int] = field(default_factory=lambda: {"gpu-h100": 2})
    jitter: float = 0.3  # sigma of the log-normal per-device factor on compute and bandwidth
    timezone_spread_h: float = 8.0  # device time zones uniform over this many hours
    seed: int = 0

    def check(self, classes: dict[str, HardwareClass]) -> None:
        unknown = (set(self.mix) | set(self.gpu_nodes)) - set(classes)
        if unknown:
            raise UserError(f"population names unknown hardware classes {sorted(unknown)} (known: {', '.join(classes)})")
        if self.devices < 0 or any(v < 0 for v in self.mix.values()) or any(n < 0 for n in self.gpu_nodes.values()):
            raise UserError("population: devices, mix fractions and gpu_nodes must be non-negative")
        if self.devices and not sum(self.mix.values()) > 0:
            raise UserError("population: mix fractions must not all be zero")
        if self.jitter < 0 or not 0 <= self.timezone_spread_h <= 24:
            raise UserError("population: jitter must be >= 0 and timezone_spread_h within 0..24")


@dataclass(frozen=True)
class VirtualDevice:
    """One simulated participant: what it declares (``capabilities``) and how it behaves."""

    id: int
    hardware: str  # class name
    capabilities: Capabilities
    tz_offset_h: float  # local time = UTC + offset
    window: tuple[float, float]
    session_s: float
    gap_s: float
    dropout: float
    overhead_s: float

    def window_at(self, t: float) -> tuple[float, float]:
        """The availability window (absolute virtual seconds) that holds ``t``, or the next one."""
        start_h, end_h = self.window
        if (end_h - start_h) % 24 == 0 and end_h != start_h:
            return t, math.inf  # open all day
        length = ((end_h - start_h) % 24) * HOUR
        # The last window start at or before t, in absolute time.
        first = (start_h - self.tz_offset_h) * HOUR
        start = first + math.floor((t - first) / DAY) * DAY
        if t >= start + length:
            start += DAY
        return start, start + length

    def first_session(self, rng: np.random.Generator) -> tuple[float, float]:
        """The first session from time 0, drawn from the steady state: inside its window a
        device is online with probability session / (session + gap), for an exponential rest
        of session (memoryless), else it starts as ``next_session`` does."""
        w_start, w_end = self.window_at(0.0)
        if w_start <= 0.0 and rng.uniform() < self.session_s / (self.session_s + self.gap_s):
            return 0.0, min(float(rng.exponential(self.session_s)), w_end)
        return self.next_session(0.0, rng)

    def next_session(self, t: float, rng: np.random.Generator) -> tuple[float, float]:
        """The next online session at or after ``t``: back after a gap, inside a window,
        lasting an exponential session clipped to the window's end."""
        s = t + (float(rng.exponential(self.gap_s)) if self.gap_s > 0 else 0.0)
        w_start, w_end = self.window_at(s)
        s = max(s, w_start)
        return s, min(s + float(rng.exponential(self.session_s)), w_end)


def sample_population(classes: dict[str, HardwareClass], config: PopulationConfig) -> list[VirtualDevice]:
    """The population, deterministic for ``config.seed``: class counts by largest remainder
    (so 1,000 devices at 40% phone-low are exactly 400), devices in seeded random order, then
    the GPU nodes, whose hardware draws do not depend on the devices'."""
    config.check(classes)
    rng = np.random.default_rng(config.seed)
    names = sorted(config.mix)
    share = np.array([config.mix[n] for n in names], dtype=float)
    share = share / share.sum() * config.devices if config.devices else share * 0
    counts = np.floor(share).astype(int)
    for i in np.argsort(counts - share, kind="stable")[: config.devices - counts.sum()]:
        counts[i] += 1
    kinds = [n for n, c in zip(names, counts) for _ in range(c)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    kinds += [n for n in sorted(config.gpu_nodes) for _ in range(config.gpu_nodes[n])]
    factors = np.exp(config.jitter * rng.standard_normal((len(kinds), 3)))
    offsets = rng.uniform(-config.timezone_spread_h / 2, config.timezone_spread_h / 2, len(kinds))
    # The nodes' draws come from a stream of their own, so a seed gives the same nodes with any
    # number of devices (``compare``'s gpu-only run drops the devices, not the nodes' hardware).
    nodes = len(kinds) - config.devices
    node_rng = np.random.default_rng((config.seed, 1))
    factors[config.devices:] = np.exp(config.jitter * node_rng.standard_normal((nodes, 3)))
    offsets[config.devices:] = node_rng.uniform(-config.timezone_spread_h / 2, config.timezone_spread_h / 2, nodes)
    out = []
    for i, (kind, f, tz) in enumerate(zip(kinds, factors, offsets)):
        hw = classes[kind]
        caps = Capabilities(role=hw.role, memory_bytes=hw.memory_bytes, flops=hw.flops * float(f[0]),
                            runtimes=hw.runtimes, up_bytes_s=hw.up_bytes_s * float(f[1]),
                            down_bytes_s=hw.down_bytes_s * float(f[2]), cores=hw.cores, accelerator=hw.accelerator,
                            device_class="gpu" if hw.role == "gpu" else hw.name)
        out.append(VirtualDevice(i, kind, caps, float(tz), hw.window, hw.session_s, hw.gap_s, hw.dropout,
                                 hw.overhead_s))
    return out
