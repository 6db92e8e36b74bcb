"""Where the simulator's local training runs: in this process, or on a Ray cluster.

The engine closes a group of devices (same plan, base version and settings) and hands it over
as a ``GroupWork``: the base weights, each device's shard ranges and batch seed, the steps and
the TrainConfig. ``train_group`` trains it with ``batched.train_batched``, and both backends run
exactly that function, so Ray changes where the arithmetic happens, never what it computes: the
results are bit-identical to in-process training (same ops and dtypes; torch runs
single-threaded in each Ray worker, so the driver must too for the comparison to hold).

The engine still applies results in virtual-time order. It submits a group as soon as no task
can join it any more and collects it when its first member finishes, so a cluster trains
several groups ahead while the driver runs events: that is the speed-up. The corpus goes to
Ray's object store once; a task carries only byte ranges into it, so workers on other machines
read exactly the driver's bytes and need no data of their own.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np
import ray
import torch

from stamen.core.data import Corpus, Shard
from stamen.core.errors import UserError
from stamen.core.model import GPTConfig, load_weights
from stamen.core.plan import Plan
from stamen.core.train import TrainConfig
from stamen.simulator.batched import BatchedResult, train_batched

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class GroupWork:
    """One group's local training: everything a worker needs besides the corpus."""

    cfg: GPTConfig
    plan: Plan
    base: dict[str, torch.Tensor]  # the plan's slice of the base version, shared by the group
    ranges: list[np.ndarray]  # each device's shard, as (start, end) ranges into the corpus
    seeds: list[int]  # each device's batch-stream seed (its task's)
    batch_size: int
    seq_len: int
    steps: int
    train: TrainConfig
    step_offset: int
    max_group: int  # devices per batched step: bounds memory, not results


def train_group(work: GroupWork, corpus: Corpus) -> list[BatchedResult]:
    """Train the group, ``max_group`` devices per ``train_batched`` call; one result per chunk."""
    model = work.plan.build(work.cfg)
    load_weights(model, work.base)
    streams = [Shard(corpus, r).batches(work.batch_size, work.seq_len, seed=s) for r, s in zip(work.ranges, work.seeds)]
    return [train_batched(model, streams[i:i + work.max_group], work.steps, work.train, work.step_offset)
            for i in range(0, len(streams), work.max_group)]


class LocalBackend:
    """Trains a group in this process, when its results are first needed (as little memory
    held as possible: nothing is computed ahead)."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def submit(self, work: GroupWork) -> GroupWork:
        return work

    def result(self, handle: GroupWork) -> list[BatchedResult]:
        return train_group(handle, self.corpus)

    def close(self) -> None:
        pass


def _train_on_worker(work: GroupWork, corpus: Corpus) -> list[BatchedResult]:
    torch.set_num_threads(1)  # one CPU per task, and the same reductions as a 1-thread driver
    return train_group(work, corpus)


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an address nothing answers at: ``ray.init`` would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"a Ray address is HOST:PORT (as `ray start --head` prints it), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e}") from None


class RayBackend:
    """Trains groups as Ray tasks (one CPU each) as soon as they are submitted.

    ``address`` names a running cluster ("HOST:6379", after ``ray start --head`` there); ""
    starts a local Ray with ``num_cpus`` (None: all cores). A Ray already initialised in this
    process is used as it is and left running."""

    def __init__(self, corpus: Corpus, address: str = "", num_cpus: int | None = None) -> None:
        self.owned = not ray.is_initialized()
        if self.owned and address:
            _reachable(address)
            ray.init(address=address, log_to_driver=False)
        elif self.owned:
            # "local": a new Ray of our own even when `ray start` runs on this machine (ray.init()
            # would attach to that cluster, and refuses num_cpus there)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        self.corpus = ray.put(corpus)
        self.train = ray.remote(num_cpus=1)(_train_on_worker)

    def submit(self, work: GroupWork) -> ray.ObjectRef:
        return self.train.remote(work, self.corpus)

    def result(self, handle: ray.ObjectRef) -> list[BatchedResult]:
        return ray.get(handle)

    def close(self) -> None:
        if self.owned:
            ray.shutdown()


def check_backend(name: str, address: str) -> None:
    """Refuse an unknown backend, or an address without Ray, before any work is done."""
    if name not in BACKENDS:
        raise UserError(f"unknown simulation backend {name!r}: use one of {', '.join(BACKENDS)}")
    if address and name != "ray":
        raise UserError(f"a Ray address ({address!r}) needs backend = \"ray\"")


def make_backend(name: str, corpus: Corpus, address: str = "") -> LocalBackend | RayBackend:
    """The backend a simulation's ``backend`` and ``address`` settings name."""
    check_backend(name, address)
    return LocalBackend(corpus) if name == "local" else RayBackend(corpus, address)
