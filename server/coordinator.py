"""The federation's cycle in one object: issue a task, admit an update, accept it, publish a
version, serve weights. Pure logic with the clock passed in and no I/O, so the HTTP server
(``service.py``: auth, ledger, store and HTTP around it) and the simulator (``engine.py``: a
virtual clock around it) drive the very same rules, as Flower's Strategy owns the loop while
its Grid only moves messages.

It owns the scheduler (who trains what) and the aggregator (how updates merge), and nobody
else touches their state: callers see tasks, verdicts and bytes.

An update is admitted in three steps, each public so a server can run the costly one on a
worker thread: ``open`` (ownership, duplicate, deadline; cheap, reads state), ``decode``
(bounded decode against the task's plan manifest, token bound, loss; pure, no state), and
``judge`` (staleness against the current version: a stale update closes its task, so the
client's next poll gets fresh work). ``admit`` runs all three. Nothing changes until
``accept``, which merges the update (through the caller's ``commit``, so a server can make it
durable first), closes the task, and on a flush advances the global step counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

import torch

from stamen.compression.codecs import decode
from stamen.compression.downlink import encode_delta, encode_weights
from stamen.core.errors import UserError
from stamen.core.model import GPTConfig
from stamen.core.lora import LoraSpace
from stamen.core.plan import Plan, full_plan
from stamen.core.records import Capabilities, Task, Update
from stamen.core.wire import Limits
from stamen.server.aggregator import Aggregator, BadUpdate, FlushReport, StaleUpdate
from stamen.server.config import FederationConfig
from stamen.server.scheduler import Assignment, Scheduler

# How the server hands an accepted update to the aggregator (a store journals it first) and
# how it runs a time-driven flush; both default to the aggregator's own, undurable, methods.
Commit = Callable[[Aggregator, Update, float], "FlushReport | None"]
Flush = Callable[[Aggregator, float], "FlushReport | None"]


class RequestError(UserError):
    """A request the federation refuses, with its HTTP status and a reason."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


MAX_FLOPS = 1e21  # FLOP/s a client may declare: a thousand of today's largest nodes (bounds step counts)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Per capability: the test its value must pass, and what the reason says it must be.
_CAPS = {
    "role": (lambda v: isinstance(v, str), "a string"),
    "memory_bytes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63,
                     "a positive integer"),
    "flops": (lambda v: _number(v) and 0 < v <= MAX_FLOPS, f"a positive number of FLOP/s up to {MAX_FLOPS:g}"),
    "runtimes": (lambda v: isinstance(v, (list, tuple)) and 0 < len(v) <= 16 and all(isinstance(r, str) for r in v),
                 "a non-empty list of strings"),
    "up_bytes_s": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "down_bytes_s": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "cores": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**20, "a positive integer"),
    "accelerator": (lambda v: isinstance(v, str), "a string"),
    "device_class": (lambda v: isinstance(v, str), "a string"),
}
assert set(_CAPS) == {f.name for f in fields(Capabilities)}


def checked_capabilities(caps: dict) -> Capabilities:
    """Capabilities from a join body, every value type- and range-checked (422 naming the
    first bad one): they size the client's work, so ``flops = inf`` must not reach arithmetic."""
    for key, (ok, what) in _CAPS.items():
        if key in caps and not ok(caps[key]):
            raise RequestError(f"bad capabilities: {key} must be {what}, got {caps[key]!r:.60}", 422)
    for key in ("role", "memory_bytes", "flops"):
        if key not in caps:
            raise RequestError(f"bad capabilities: {key} is required", 422)
    return Capabilities.from_dict(caps)


class TaskClosed(RequestError):
    """The task's deadline passed, or its update was refused as stale (HTTP 410)."""

    status = 410

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} is closed (its deadline passed, or its update was refused "
                         "as stale): ask for a new task")


@dataclass(frozen=True)
class Admitted:
    """An update that passed every check and may be accepted now."""

    update: Update
    staleness: int
    loss: float | None


@dataclass(frozen=True)
class Accepted:
    """What accepting an update did: the version now current, and the flush it triggered."""

    version: int
    report: FlushReport | None


class Coordinator:
    def __init__(self, cfg: GPTConfig, fed: FederationConfig, agg: Aggregator, seed: int = 0,
                 global_step: int = 0, next_seq: int = 0, open_tasks: Iterable[Task] = ()) -> None:
        self.cfg, self.fed = cfg, fed
        self._agg = agg
        self._scheduler = Scheduler(cfg, fed, seed, global_step=global_step, next_seq=next_seq)
        for task in open_tasks:
            self._scheduler.restore_task(task)
        self._plans: dict[str, Plan] = {p.hash: p for plans in self._scheduler.plans.values() for p in plans}
        self._tier_hashes = {t: frozenset(p.hash for p in plans) for t, plans in self._scheduler.plans.items()}
        if not isinstance(cfg, LoraSpace):  # a LoRA federation has only its tiers' rank plans
            self._plans.setdefault(full_plan(cfg).hash, full_plan(cfg))
        self._limits: dict[Plan, Limits] = {}
        agg.pace(False)

    # --- reads ------------------------------------------------------------------------------
    @property
    def aggregator(self) -> Aggregator:
        """For the store only (journal replay and checkpoints); everyone else asks the coordinator."""
        return self._agg

    @property
    def version(self) -> int:
        return self._agg.version

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The current global weights (read-only)."""
        return self._agg.weights

    @property
    def global_step(self) -> int:
        return self._scheduler.global_step

    @property
    def buffered(self) -> int:
        """Updates accepted since the last flush."""
        return self._agg.buffer.count

    @property
    def in_flight(self) -> int:
        """Tasks issued and neither uploaded, lapsed nor abandoned."""
        return len(self._scheduler.in_flight)

    @property
    def tier_plans(self) -> dict[str, tuple[Plan, ...]]:
        """Tier name → its plans (one, or a rotating tier's windows)."""
        return dict(self._scheduler.plans)

    def plan_hashes(self, tier: str) -> frozenset[str]:
        """The hashes of the plans a tier's tasks take (a rotating tier has several)."""
        return self._tier_hashes[tier]

    def clients(self) -> list[Assignment]:
        return list(self._scheduler.clients.values())

    def assignment(self, client_id: str) -> Assignment | None:
        return self._scheduler.clients.get(client_id)

    def open_tasks(self) -> list[Task]:
        """The tasks in flight, in the order they were issued."""
        return list(self._scheduler.in_flight.values())

    def round_deadline(self) -> float | None:
        """When the first of the current version's tasks lapses (None if none is out)."""
        return self._scheduler.round_deadline(self._agg.version)

    def held(self, client_id: str) -> Task | None:
        """The task the client holds now (``next_task`` gives it again), if any."""
        return self._scheduler.held(client_id)

    def open_task(self, task_id: str) -> Task | None:
        """The task if it is in flight."""
        return self._scheduler.in_flight.get(task_id)

    def is_open(self, task_id: str) -> bool:
        return self.open_task(task_id) is not None

    def kept(self, version: int | None) -> bool:
        """Whether ``version``'s weights are still held (a delta can be built from it)."""
        return version is not None and version in self._agg.history

    def weights_at(self, version: int) -> dict[str, torch.Tensor]:
        try:
            return self._agg.weights_at(version)
        except BadUpdate as e:
            raise RequestError(str(e), 410) from None

    # --- clients and tasks ------------------------------------------------------------------
    def tier_for(self, caps: Capabilities) -> str:
        """The tier a client with these capabilities would get: the whole judgement of
        ``register`` (role, runtimes, memory), without registering; raises if none fits."""
        return self._scheduler.admit(caps)

    def register(self, client_id: str, caps: Capabilities) -> Assignment:
        """Place a client in its tier. Versions are paced by ``paced_by``'s tiers only while one
        of their clients is registered: a federation without any counts every update toward K."""
        a = self._scheduler.register(client_id, caps)
        self._agg.pace(self._scheduler.pacing)
        return a

    def next_task(self, client_id: str, now: float) -> Task | None:
        """The client's task at the current version (see ``Scheduler.next_task``); None for
        everyone once the privacy budget is spent (training has stopped)."""
        if self._agg.privacy_spent:
            return None
        return self._scheduler.next_task(client_id, self._agg.version, now)

    @property
    def stopped(self) -> bool:
        """Training has stopped: the privacy budget is spent."""
        return self._agg.privacy_spent

    def privacy(self) -> dict | None:
        """Privacy spent so far (central DP on), for status, metrics and reports; else None."""
        p = self._agg.config.privacy
        if not p.enabled:
            return None
        return {"epsilon": self._agg.epsilon(), "delta": p.delta, "flushes": self._agg.dp_flushes,
                "noise_multiplier": p.noise_multiplier, "clip": p.clip, "budget": p.budget,
                "stopped": self._agg.privacy_spent}

    def expire(self, now: float) -> list[Task]:
        """Close the tasks past their deadline and return them."""
        return self._scheduler.expire(now)

    def release(self, client_id: str, task: Task) -> bool:
        """The client gives ``task`` back before uploading (it is stopping): close it now, so its
        work goes to whoever asks next instead of waiting for the deadline. False when it was
        closed already; raises when it is another client's."""
        if task.client_id != client_id:
            raise RequestError(f"task {task.task_id!r} belongs to another client", 403)
        return self._scheduler.abandon(task.task_id) is not None

    # --- updates ----------------------------------------------------------------------------
    def open(self, client_id: str, task: Task) -> bool:
        """Whether ``client_id`` may upload for ``task`` now: False for a re-send of an accepted
        update (answer it as a duplicate); raises when the task is another client's or closed."""
        if task.client_id != client_id:
            raise RequestError(f"task {task.task_id!r} belongs to another client", 403)
        if task.task_id in self._agg.seen:
            return False
        if task.task_id not in self._scheduler.in_flight:
            raise TaskClosed(task.task_id)
        return True

    def limits(self, task: Task) -> Limits:
        """What the decoder accepts for ``task``: its plan's trainable tensors, each at most fp64
        sized, in a body no larger than the server's cap (built once per plan)."""
        known = self._limits.get(task.plan)
        if known is not None:
            return known
        shapes = task.plan.shapes(self.cfg)
        manifest = {n: shapes[n] for n in task.plan.trainable(self.cfg)}
        known = self._limits[task.plan] = Limits(max_compressed_bytes=self.fed.server.max_body_mib << 20,
                      max_decompressed_bytes=8 * sum(math.prod(s) for s in manifest.values()) + 4096,
                      max_tensors=len(manifest), manifest=manifest)
        return known

    def decode(self, task: Task, body: bytes) -> tuple[Update, float | None]:
        """The update in ``body`` for ``task`` and its reported loss (None if absent or not
        finite): a bounded decode against the plan (names, shapes, finite values), then the
        token bound (at most the task's steps × batch × sequence length). Pure: safe on a
        worker thread."""
        payload = decode(body, self.limits(task))
        if payload.kind != "update":
            raise RequestError(f"expected an update payload, got {payload.kind!r}", 422)
        most = task.steps * task.batch_size * task.seq_len
        tokens = payload.meta.get("tokens")
        if not (isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens <= most):
            raise RequestError(f"tokens must be an integer in [1, {most}] for this task, got {tokens!r}", 422)
        loss = payload.meta.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        delta, flat = payload.tensors, None
        if len(payload.squares) < len(delta):  # a tensor sent as another dtype than float32 (squares: the float32 ones)
            delta = {n: t if t.dtype == torch.float32 else t.float() for n, t in delta.items()}
        elif payload.flat is not None:
            flat = torch.from_numpy(payload.flat)
        update = Update(task.task_id, task.base_version, task.plan, delta, tokens, {} if loss is None else {"loss": loss},
                        flat)
        # the values' pass, here on the worker rather than in ``judge``; names and shapes were
        # checked against the plan's manifest by the decode
        self._agg.measure(update, payload.squares, shaped=True)
        return update, loss

    def judge(self, update: Update, loss: float | None = None) -> Admitted:
        """Staleness and structure against the current version. A stale update can never be
        merged now: its task is closed (so the client's next poll gets fresh work) and
        StaleUpdate raised; the caller records the task as lapsed."""
        try:
            adm = self._agg.check(update)
        except StaleUpdate:
            self._scheduler.abandon(update.task_id)
            raise
        return Admitted(update, adm.staleness, loss)

    def admit(self, client_id: str, task: Task, body: bytes) -> Admitted | None:
        """Every rule an upload must pass, in one place (``open``, ``decode``, ``judge``); None
        for a duplicate. Raises RequestError/WireError/StaleUpdate/BadUpdate with the reason."""
        if not self.open(client_id, task):
            return None
        return self.judge(*self.decode(task, body))

    def accept(self, admitted: Admitted, now: float, commit: Commit | None = None) -> Accepted:
        """Merge an admitted update (``commit``: the store's durable apply; by default the
        aggregator's own), close its task, and on a flush advance the global step counter."""
        update = admitted.update
        try:
            report = (commit or _submit)(self._agg, update, now)
        except StaleUpdate:  # a group-committed batch: a flush ahead of it in the journal made it stale
            self._scheduler.abandon(update.task_id)
            raise
        self._scheduler.complete(update.task_id, now)
        if report is not None:
            self._scheduler.published()
        return Accepted(self._agg.version, report)

    def flush_due(self, now: float) -> bool:
        """Whether the time-driven flush is due (a server journals it before ``poll``)."""
        return self._agg.due(now)

    def poll(self, now: float, flush: Flush | None = None) -> FlushReport | None:
        """The time-driven flush (the aggregator's max wait), if due (``flush``: the store's
        journaled one; by default the aggregator's own)."""
        report = (flush or _poll)(self._agg, now)
        if report is not None:
            self._scheduler.published()
        return report

    # --- weights ----------------------------------------------------------------------------
    def plan(self, plan_hash: str) -> Plan:
        plan = self._plans.get(plan_hash)
        if plan is None:
            raise RequestError(f"unknown plan {plan_hash!r}", 404)
        return plan

    def download(self, plan: Plan, version: int, have: int | None = None) -> bytes:
        """The plan's slice of version ``version``, exact: as the change from version ``have``
        when the client holds it (frozen and unchanged tensors then cost nearly nothing after
        zstd), else whole; 410 when either version is no longer kept."""
        target = plan.extract(self.weights_at(version), self.cfg)
        if have is None or have == version:
            return encode_weights(target, version)
        return encode_delta(plan.extract(self.weights_at(have), self.cfg), target, have, version)


def _submit(agg: Aggregator, update: Update, now: float) -> FlushReport | None:
    return agg.submit(update, now)


def _poll(agg: Aggregator, now: float) -> FlushReport | None:
    return agg.poll(now)
