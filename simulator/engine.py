"""The virtual-clock simulation: thousands of virtual devices driving the real coordinator
(scheduler and aggregator) and codecs, with time taken from their hardware profiles instead of
a wall clock: the engine adds only the clock, the devices and the training.

Events fire in virtual-time order (ties broken by the order they were scheduled, so a seed
gives one history). A device comes online for a session and asks the *real* ``Coordinator``
for a task; it downloads its plan's weights (the size of the server's real download over its
downlink), trains (the plan's FLOPs over its compute rate), may drop out, encodes its update
with the task's real codec and its own error feedback, uploads it over its uplink, and the
coordinator admits the bytes at their virtual arrival time under the server's very rules.
Staleness, stragglers, lapsed deadlines and diurnal availability arise from that, not from
assumptions.

Local training really happens, lazily and batched: tasks that share a plan, base version and
settings join one group, and the group trains (``batched.train_batched``) when its first task
finishes in virtual time. Batched equals alone, so grouping never changes a result. GPU nodes
keep their inner AdamW across tasks in a ``TorchRuntime`` each, as they do in deployment.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from stamen.core.data import Shard, load_corpus, partition, public_groups
from stamen.core.errors import UserError
from stamen.core.model import GPT, ModelSpec, load_weights, weights
from stamen.core.records import Task
from stamen.core.train import evaluate
from stamen.edge_client.runtime import TorchRuntime
from stamen.server.aggregator import Aggregator, StaleUpdate
from stamen.server.config import FederationConfig
from stamen.server.coordinator import Coordinator, TaskClosed
from stamen.simulator.attackers import AttackConfig, Attackers
from stamen.simulator.profiles import HardwareClass, PopulationConfig, VirtualDevice, sample_population
from stamen.simulator.ray_backend import GroupWork, make_backend
from stamen.simulator.residuals import ResidualStore


EVAL_BATCH = 32  # sequences per validation batch, as core.baseline's default batch size


@dataclass(frozen=True)
class SimConfig:
    """What to simulate and for how long (the federation's own settings come separately)."""

    model: str = "gpt-tiny"
    data: str = "stdlib"
    partition: str = "natural"
    # Who holds which text. "shared": GPU nodes read the whole training split and devices
    # split it too (devices bring compute only). "private": GPU nodes read a public share of
    # the packages (``public_share`` of the bytes) and devices split the rest, text nobody
    # else holds (Photon's premise); validation is then also reported per domain. "pooled":
    # as private, but the GPU nodes read the devices' packages too (their text handed to the
    # datacenter: what it is worth to the nodes' own steps, the reference ``--compare``'s
    # gpu-only-pooled measures).
    text: str = "private"
    public_share: float = 0.5
    population: PopulationConfig = field(default_factory=PopulationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)  # [population.attackers]
    seed: int = 0
    horizon_h: float = 24.0  # stop after this much virtual time...
    max_versions: int = 40  # ...or once this many versions are published
    eval_every: int = 4  # versions between validation evaluations
    eval_batches: int = 8
    max_group: int = 128  # devices trained together in one batched step (bounds memory)
    baseline: bool = True  # the report also trains centrally on as many tokens
    nodes_alone: bool = True  # the report also runs the GPU nodes without the devices (to the same virtual time)
    backend: str = "local"  # where devices train: "local" (this process) or "ray" (ray_backend.py)
    address: str = ""  # the Ray cluster's head, HOST:6379 ("" = start a local Ray)


@dataclass
class Counters:
    tasks: int = 0
    accepted: int = 0
    tokens: int = 0  # trained by accepted updates
    stale: int = 0
    lapsed: int = 0  # arrived after the task's deadline
    refused: int = 0  # refused by the coordinator for another reason (SimResult.refusals says why)
    dropped: int = 0  # dropped out, or the session ended before the upload
    bytes_down: int = 0
    bytes_up: int = 0
    busy_s: float = 0.0  # device-seconds spent downloading, training, uploading


@dataclass
class SimResult:
    """The run's history in virtual time; ``summary()`` is deterministic for a seed."""

    evals: list[dict] = field(default_factory=list)  # version, time_h, tokens, val_loss
    flushes: list[dict] = field(default_factory=list)  # version, time_h, updates, tokens, staleness
    staleness: list[int] = field(default_factory=list)  # per accepted update
    per_tier: dict[str, dict[str, int]] = field(default_factory=dict)  # updates, tokens, bytes_up
    per_class: dict[str, Counters] = field(default_factory=dict)  # the counters by hardware class
    counters: Counters = field(default_factory=Counters)
    devices: dict[str, int] = field(default_factory=dict)  # hardware class → count
    unplaced: int = 0  # devices whose memory fits no tier
    attackers: int = 0  # devices sending forged updates ([population.attackers])
    privacy: dict | None = None  # epsilon spent, with central DP on (Coordinator.privacy)
    refusals: dict[str, int] = field(default_factory=dict)  # the coordinator's reason → updates refused so
    end_time_h: float = 0.0

    def summary(self) -> dict:
        c = self.counters
        return {"devices": self.devices, "unplaced": self.unplaced, "attackers": self.attackers, "end_time_h": round(self.end_time_h, 6),
                "versions": self.flushes[-1]["version"] if self.flushes else 0,
                "counters": _rounded(c), "per_tier": self.per_tier,
                "per_class": {k: _rounded(v) for k, v in sorted(self.per_class.items())}, "evals": self.evals,
                "flushes": self.flushes, "privacy": self.privacy,
                "final_val_loss": self.evals[-1]["val_loss"] if self.evals else None,
                "mean_staleness": float(np.mean(self.staleness)) if self.staleness else None,
                "staleness_hist": np.bincount(self.staleness).tolist() if self.staleness else []}


@dataclass
class _Job:
    """A task in flight on a virtual device."""

    task: Task
    device: VirtualDevice
    tier: str
    started: float  # when its current phase (download + train, then upload) began
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights it downloaded
    group: tuple | None = None
    delta: dict[str, torch.Tensor] | None = None
    tokens: int = 0
    loss: float = float("nan")


class Simulation:
    def __init__(self, config: SimConfig, fed: FederationConfig, classes: dict[str, HardwareClass]) -> None:
        self.config, self.fed = config, fed
        self.cfg = ModelSpec(config.model).gpt_config()
        if self.cfg is None:
            raise UserError(f"the simulator trains stamen's GPT family; {config.model!r} is not one")
        self.rng = np.random.default_rng(config.seed)
        self.devices = sample_population(classes, config.population)
        corpus = load_corpus(config.data)
        train, val = corpus.split()
        # Devices split their text (config.partition); a GPU node is a datacentre holding a broad
        # corpus (Photon's sites hold large C4 shards) and trains on all of its text. Dealt one
        # 1/1000th of one package like a phone, the nodes that bring most tokens and alone train
        # the embeddings overfit it, and validation loss jumped by nats between versions.
        gpu_text, device_text, domains = text_split(config, corpus, train, val)
        n = sum(d.capabilities.role == "device" for d in self.devices)
        parts = iter(partition(device_text, n, config.partition, config.seed,
                                       seq_len=fed.training.seq_len) if n else [])
        self.shards: list[Shard] = [next(parts) if d.capabilities.role == "device" else gpu_text
                                    for d in self.devices]
        self.backend = make_backend(config.backend, train.corpus, config.address)
        # The centralized baseline's validation batches (core.baseline), so the curves compare.
        self.val = {name: shard.fixed_batches(config.eval_batches, EVAL_BATCH, fed.training.seq_len,
                                              seed=config.seed + 1) for name, shard in domains.items()}
        torch.manual_seed(config.seed)
        self.eval_model = GPT(self.cfg)
        agg_config = fed.aggregator_config()
        if agg_config.privacy.enabled and agg_config.privacy.seed is None:  # a seed gives one history
            agg_config = replace(agg_config, privacy=replace(agg_config.privacy, seed=config.seed))
        self.coord = Coordinator(self.cfg, fed, Aggregator(self.cfg, weights(self.eval_model), agg_config),
                                 seed=config.seed)
        self.result = SimResult()
        self.tiers: dict[int, str] = {}
        for d in self.devices:
            self.result.devices[d.hardware] = self.result.devices.get(d.hardware, 0) + 1
            try:
                self.tiers[d.id] = self.coord.register(_cid(d.id), d.capabilities).tier
            except UserError:
                self.result.unplaced += 1
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.session_end: dict[int, float] = {}
        self.held: dict[int, int] = {}  # device → version of the weights it holds
        self.feedback = ResidualStore()  # on disk between a device's tasks: memory follows the tasks in flight
        self.gpu_runtimes: dict[int, TorchRuntime] = {}
        self._node_tasks: dict[int, int] = {}  # GPU node → tasks it has trained (its batch stream)
        # A node's place among the nodes (its device id moves with the number of devices drawn).
        self._node_rank = {d.id: i for i, d in enumerate(d for d in self.devices if d.capabilities.role != "device")}
        self.groups: dict[tuple, list[_Job]] = {}  # open groups, not yet trained
        self.submitted: dict[tuple, tuple[list[_Job], object]] = {}  # closed groups, training on the backend
        self.generation: dict[tuple, int] = {}
        self._download_sizes: dict[tuple, int] = {}
        self._issued: set[str] = set()
        self.waiting: set[int] = set()  # devices a full round held back until its next version
        self.polling: dict[int, None] = {}  # devices in a long poll for a place in flight, oldest first
        self._sweep_at = math.inf
        self.gpu_nodes = sum(d.id in self.tiers and d.capabilities.role != "device" for d in self.devices)
        self.attackers = Attackers(config.attack, [d.id for d in self.devices if d.capabilities.role == "device"],
                                   config.seed)
        self.result.attackers = len(self.attackers.ids)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The federation's current global weights."""
        return self.coord.weights

    # --- the event queue --------------------------------------------------------------------
    def _push(self, t: float, kind: str, item: object) -> None:
        heapq.heappush(self.events, (t, self.seq, kind, item))
        self.seq += 1

    def run(self, on_version: Callable[[int], None] | None = None, target_loss: float | None = None) -> SimResult:
        """Run until the horizon or the version cap, or until an evaluation reaches
        ``target_loss`` (compare.py times runs to a target); ``on_version`` drives a progress bar."""
        for d in self.devices:
            if d.id in self.tiers:
                self._session(d, *d.first_session(self.rng))
        self._evaluate(0.0)
        horizon = self.config.horizon_h * 3600
        t = 0.0
        while (self.events and self.coord.version < self.config.max_versions and not self._reached(target_loss)
               and not self.coord.stopped):
            t, _, kind, item = heapq.heappop(self.events)
            if t > horizon:
                t = horizon
                break
            version = self.coord.version
            report = self.coord.poll(t)
            if report is not None:
                self._published(t, report)
            getattr(self, f"_on_{kind}")(item, t)
            if on_version is not None and self.coord.version != version:
                on_version(self.coord.version)
        self.backend.close()
        self.feedback.close()
        self.result.end_time_h = t / 3600
        self.result.privacy = self.coord.privacy()
        if not self.result.evals or self.result.evals[-1]["version"] != self.coord.version:
            self._evaluate(t)
        return self.result

    def _reached(self, target_loss: float | None) -> bool:
        return target_loss is not None and self.result.evals[-1]["val_loss"] <= target_loss

    # --- devices ----------------------------------------------------------------------------
    def _offline(self, d: VirtualDevice, t: float) -> None:
        self._session(d, *d.next_session(t, self.rng))

    def _session(self, d: VirtualDevice, start: float, end: float) -> None:
        self.session_end[d.id] = end
        self._push(start, "online", d)

    def _on_online(self, d: VirtualDevice, t: float) -> None:
        if t >= self.session_end[d.id]:
            return self._offline(d, t)
        task = self.coord.next_task(_cid(d.id), t)
        if task is None and (self.fed.aggregation.mode == "rounds" or self.tiers[d.id] in self.fed.aggregation.paced_by):
            return self._hold(d)
        if task is None:  # the cap on tasks in flight, or it yields its place: a long poll
            self.polling[d.id] = None
            return self._push(t + self.fed.server.long_poll_s, "poll", d)
        # A task it ran already: the device dropped out of it without telling the server, which
        # holds it until its deadline.
        if task.task_id in self._issued:
            return self._push(max(task.deadline, t + 1.0), "online", d)
        self._issued.add(task.task_id)
        self._count(d, tasks=1)
        job = _Job(task, d, self.tiers[d.id], started=t)
        caps = d.capabilities
        down = self._download_size(task.plan, self.held.get(d.id), task.base_version)
        cost = task.plan.cost(self.cfg, task.batch_size, task.seq_len)
        compute = cost.flops_per_token * task.steps * task.batch_size * task.seq_len / caps.flops
        done = t + d.overhead_s + down / caps.down_bytes_s + compute
        quit_at = t + self.rng.uniform() * (done - t) if self.rng.uniform() < d.dropout else math.inf
        quit_at = min(quit_at, self.session_end[d.id])
        if quit_at < done:
            self._count(d, dropped=1, bytes_down=int(min(down, (quit_at - t) * caps.down_bytes_s)), busy_s=quit_at - t)
            return self._offline(d, quit_at)
        self._count(d, bytes_down=down)
        self.held[d.id] = task.base_version
        if caps.role == "device":
            key = (task.plan.hash, task.base_version, task.step_offset, task.steps, task.batch_size,
                   task.seq_len, task.train)
            job.group = key + (self.generation.get(key, 0),)
            members = self.groups.setdefault(job.group, [])
            job.base = members[0].base if members else self._extract(task)  # one copy per group
            members.append(job)
        else:
            job.base = self._extract(task)
        self._push(done, "trained", job)

    def _extract(self, task: Task) -> dict[str, torch.Tensor]:
        return task.plan.extract(self.coord.weights_at(task.base_version), self.cfg)

    def _on_trained(self, job: _Job, t: float) -> None:
        if job.delta is None:
            self._train(job)
        d, task = job.device, job.task
        if d.id in self.attackers:
            job.delta = self.attackers.forge(d.id, task.plan.hash, task.base_version, job.delta)
        self._count(d, busy_s=t - job.started)  # counted when done, so never past the run's end
        job.started = t
        ef = self.feedback.get(d.id)
        payload = ef.encode(task.plan.hash, job.delta, task.codec, meta={"tokens": job.tokens, "loss": job.loss})
        self.feedback.put(d.id, ef)
        job.delta, job.base = None, {}
        arrive = t + len(payload) / d.capabilities.up_bytes_s
        if arrive > self.session_end[d.id]:
            self._count(d, dropped=1, busy_s=self.session_end[d.id] - t)
            return self._offline(d, self.session_end[d.id])
        self._count(d, bytes_up=len(payload))
        self._push(arrive, "arrive", (job, payload))

    def _on_poll(self, d: VirtualDevice, t: float) -> None:
        """A long poll ran out without a place (none was woken): the device asks again."""
        if d.id in self.polling:
            del self.polling[d.id]
            self._on_online(d, t)

    def _wake_polling(self, places: int, t: float) -> None:
        """Places in flight came free: the devices longest in a long poll ask now, as the
        server's long poll answers a waiting client within a poll step of a place freeing
        (``server.app.task``), where a device back with its update yields (``Scheduler._yields``)."""
        while places > 0 and self.polling:
            i = next(iter(self.polling))
            del self.polling[i]
            if t < self.session_end[i]:
                self._push(t, "online", self.devices[i])
                places -= 1

    def _on_arrive(self, item: tuple[_Job, bytes], t: float) -> None:
        job, payload = item
        task = job.task
        self._count(job.device, busy_s=t - job.started)
        self._wake_polling(1 + len(self.coord.expire(t)), t)
        try:  # the server's admission, rule for rule (Federation.submit)
            admitted = self.coord.admit(task.client_id, task, payload)
        except TaskClosed:
            self._count(job.device, lapsed=1)
        except StaleUpdate:  # the coordinator closed the task, as the server does on a 409
            self._count(job.device, stale=1)
        except UserError as e:
            self._count(job.device, refused=1)
            self.result.refusals[str(e)] = self.result.refusals.get(str(e), 0) + 1
        else:
            accepted = self.coord.accept(admitted, t)
            self._accepted(job, admitted.staleness, len(payload))
            if accepted.report is not None:
                self._published(t, accepted.report)
        self._on_online(job.device, t)

    # --- training ---------------------------------------------------------------------------
    def _train(self, job: _Job) -> None:
        """Train the job's whole group at once (devices), or the job alone on its node (GPUs)."""
        task, base = job.task, job.base
        if job.group is None:
            rt = self.gpu_runtimes.get(job.device.id)
            if rt is None:
                rt = self.gpu_runtimes[job.device.id] = TorchRuntime(self.cfg, task.plan, keep_optimizer=True)
            rt.set_weights(base)
            r = rt.train(self._batches(job), task.steps, task.train, task.step_offset)
            trained = rt.trained_weights()
            job.delta = {n: base[n] - trained[n] for n in trained}
            job.tokens, job.loss = r.tokens, r.final_loss
            return
        jobs, handle = self.submitted.pop(job.group) if job.group in self.submitted else self._submit(job.group)
        for first, r in zip(range(0, len(jobs), self.config.max_group), self.backend.result(handle)):
            for i, (j, delta) in enumerate(zip(jobs[first:first + self.config.max_group], r.deltas(base))):
                j.delta, j.tokens, j.loss = delta, r.tokens, float(r.losses[i, -1])

    def _submit(self, group: tuple) -> tuple[list[_Job], object]:
        """Close an open group (no task joins it any more) and hand it to the training backend."""
        jobs = self.groups.pop(group)
        key = group[:-1]
        self.generation[key] = self.generation.get(key, 0) + 1
        t = jobs[0].task
        work = GroupWork(self.cfg, t.plan, jobs[0].base, [self.shards[j.device.id].ranges for j in jobs],
                         [j.task.seed for j in jobs], t.batch_size, t.seq_len, t.steps, t.train, t.step_offset,
                         self.config.max_group)
        return jobs, self.backend.submit(work)

    def _batches(self, job: _Job):
        """A GPU node's batches for its next task. The node draws them from its own stream (the
        run's seed, the node's place among the nodes, its task count) rather than from the task's seed, which numbers
        every task the server issued: so the nodes read the same text in the same order with or
        without devices beside them, and ``compare``'s mixed and gpu-only runs differ by what
        the devices do, not by the nodes' data order (common random numbers)."""
        d = job.device.id
        n = self._node_tasks[d] = self._node_tasks.get(d, -1) + 1
        seed = int(np.random.SeedSequence((self.config.seed, self._node_rank[d], n)).generate_state(1)[0])
        return self.shards[d].batches(job.task.batch_size, job.task.seq_len, seed=seed)

    def _download_size(self, plan, have: int | None, version: int) -> int:
        """Bytes of the real download the server would send: the plan's slice of ``version``,
        as a difference from the version the device holds when the server still keeps it;
        nothing when the device holds that version already."""
        if have == version:
            return 0
        have = have if self.coord.kept(have) else None
        key = (plan.hash, have, version)
        if key not in self._download_sizes:
            self._download_sizes[key] = len(self.coord.download(plan, version, have))
        return self._download_sizes[key]

    # --- bookkeeping ------------------------------------------------------------------------
    def _count(self, d: VirtualDevice, **amounts: float) -> None:
        """Add to the run's counters and to the device's hardware class's."""
        row = self.result.per_class.setdefault(d.hardware, Counters())
        for name, amount in amounts.items():
            setattr(self.result.counters, name, getattr(self.result.counters, name) + amount)
            setattr(row, name, getattr(row, name) + amount)

    def _accepted(self, job: _Job, tau: int, nbytes: int) -> None:
        self._count(job.device, accepted=1, tokens=job.tokens)
        self.result.staleness.append(tau)
        row = self.result.per_tier.setdefault(job.tier, {"updates": 0, "tokens": 0, "bytes_up": 0})
        row["updates"] += 1
        row["tokens"] += job.tokens
        row["bytes_up"] += nbytes

    def _hold(self, d: VirtualDevice) -> None:
        """The round has no place for ``d`` (the scheduler's rounds policy), or ``d`` is a paced
        node whose update waits in the buffer for its peers': it waits for the next version, or
        for the first of this version's tasks to lapse, which may free a place (or leave it
        the only node training)."""
        self.waiting.add(d.id)
        lapse = self.coord.round_deadline()
        if lapse is not None and lapse < self._sweep_at:
            self._sweep_at = lapse
            self._push(lapse + 1e-3, "sweep", None)

    def _on_sweep(self, _: None, t: float) -> None:
        self._sweep_at = math.inf
        self._wake(t)

    def _wake(self, t: float) -> None:
        for i in sorted(self.waiting):
            self._push(t, "online", self.devices[i])
        self.waiting.clear()

    def _published(self, t: float, report) -> None:
        # Tasks are issued at the newest version, so older groups are complete: train them now
        # (a Ray backend computes them ahead while events run; results are applied in order).
        for group in [g for g in self.groups if g[1] < self.coord.version]:
            self.submitted[group] = self._submit(group)
        self._wake(t)
        if report is not None:
            self.result.flushes.append({"version": report.version, "time_h": t / 3600, "updates": report.updates,
                                        "tokens": report.tokens, "staleness": report.mean_staleness})
        if self.coord.version % self.config.eval_every == 0:
            self._evaluate(t)

    def _evaluate(self, t: float) -> None:
        load_weights(self.eval_model, self.coord.weights)
        row = {"version": self.coord.version, "time_h": t / 3600, "tokens": self.result.counters.tokens}
        for name, batches in self.val.items():
            row["val_loss" if name == "all" else f"val_{name}"] = evaluate(self.eval_model, batches)
        self.result.evals.append(row)


TEXT_MODES = ("shared", "private", "pooled")


def text_split(config: SimConfig, corpus, train: Shard, val: Shard) -> tuple[Shard, Shard, dict[str, Shard]]:
    """(GPU nodes' text, the text dealt to devices, validation shards by domain) for
    ``config.text``: "shared" gives both the whole training split and validates on all of
    it; "private" gives the GPU nodes the public packages and the devices the others, and
    validates on all, public and private held-out documents; "pooled" deals and validates as
    "private" but gives the GPU nodes the whole training split."""
    if config.text not in TEXT_MODES:
        raise UserError(f"unknown text mode {config.text!r}: use one of {', '.join(TEXT_MODES)}")
    if config.text == "shared":
        return train, train, {"all": val}
    public = public_groups(corpus, config.public_share, config.seed)
    private = set(corpus.doc_groups) - public
    return (train if config.text == "pooled" else train.select(public), train.select(private),
            {"all": val, "public": val.select(public), "private": val.select(private)})


def _rounded(c: Counters) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in vars(c).items()}


def _cid(device_id: int) -> str:
    return f"d{device_id:06d}"
