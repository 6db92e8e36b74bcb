"""The federation behind the HTTP routes: join, task, weights, update, status — as plain
methods that take bytes and return bytes/dicts, so every rule is testable without a socket and
``app.py`` stays a thin translation to HTTP.

An update is checked completely (token, ownership, task state, bounded decode against the
task's plan manifest, staleness, values) before anything changes; then it is journaled by the
store, and only then applied and acknowledged. A request that fails any check changes nothing.
A large upload is decoded on a worker thread (its zstd and numpy work runs beside the loop), a
small one on the loop itself, and the journal is group-committed (``committer.py``), so the
event loop never waits for an fsync or a long decode.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from stamen.core.errors import UserError
from stamen.core.model import ModelSpec, weights
from stamen.core.plan import Plan, global_shapes
from stamen.core.records import Task
from stamen.core.wire import FrameTooLarge, WireError
from stamen.server.aggregator import BadUpdate, FlushReport, StaleUpdate
from stamen.server.auth import Auth, Forbidden, JoinRate, Principal, RateLimited, Unauthorized
from stamen.server.committer import Committer
from stamen.server.config import FederationConfig
from stamen.server.coordinator import Admitted, Coordinator, RequestError, checked_capabilities
from stamen.server.evaluation import Evaluation, Evaluator
from stamen.server.ledger import Ledger
from stamen.server.store import Row, Store, bind_model, lock_state

log = logging.getLogger(__name__)
DECODERS = 2  # worker threads that decode large uploads
# Uploads up to this size are decoded on the event loop: a phone's (~3 KB, ~0.3 ms of Python
# that holds the GIL either way) cost more in the handoff to a worker and back (two thread
# wake-ups, the GIL passed twice) than the loop waits for it.
INLINE_DECODE_BYTES = 64 << 10
EVAL_SHARE = 0.1  # the most of the server's wall time that scoring versions may take


def http_status(e: UserError) -> int:
    """The 4xx for a refused request."""
    if isinstance(e, RequestError):
        return e.status
    if isinstance(e, Unauthorized):
        return 401
    if isinstance(e, Forbidden):
        return 403
    if isinstance(e, RateLimited):
        return 429
    if isinstance(e, StaleUpdate):
        return 409
    if isinstance(e, FrameTooLarge):
        return 413
    if isinstance(e, (BadUpdate, WireError)):
        return 422
    return 400


@dataclass
class _Applied:
    """An update applied in the committer's current batch: the ledger's figures for it, and
    the client that asked for its next task in ``answer`` (None: it did not)."""

    task_id: str
    tokens: int
    loss: float | None
    then: Principal | None
    answer: dict


class Federation:
    """Auth, the task ledger and the durable store around one ``Coordinator``, which owns every
    rule of the cycle; this class only records what the coordinator decided."""

    def __init__(self, model: str, state_dir: str | Path, fed: FederationConfig, seed: int = 0,
                 eval_data: str = "stdlib") -> None:
        spec = ModelSpec(model)
        # With [lora] the federation's global tensors are the adapter over the frozen base.
        self.lora = fed.lora.space(spec) if fed.lora.rank else None
        cfg = self.lora or spec.gpt_config()
        if cfg is None:
            raise UserError(f"model {model!r} is not a GPT: the HTTP federation serves GPT-family models, "
                            "or fine-tunes a pretrained base with LoRA ([lora] rank)")
        self.spec, self.cfg, self.fed = spec, cfg, fed
        e = fed.evaluation  # the held-out set is read before the state folder is touched: bad data changes nothing
        shape = (eval_data, e.batches, e.batch_size, fed.training.seq_len)
        self.evaluator = None if not e.every else (Evaluator.instructions(spec, self.lora, *shape) if self.lora
                                                   else Evaluator.text(cfg, *shape))
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self._lock = lock_state(state)  # before anything in the folder is opened
        bind_model(state, model, self.lora.describe() if self.lora else None)
        self.auth = Auth(state, JoinRate(fed.server.joins_per_minute, fed.server.join_burst))
        self.ledger = Ledger(state)
        self.store = Store(state, checkpoint_every=fed.server.checkpoint_every)
        torch.manual_seed(seed)  # the initial model of a new federation; a resumed one ignores it
        agg = self.store.start(cfg, self.lora.init(seed) if self.lora else weights(spec.build()),
                               fed.aggregator_config())
        self.ledger.reconcile(self.store.journaled_figures())
        self.coord = Coordinator(cfg, fed, agg, seed, global_step=self.ledger.get_meta("global_step"),
                                 next_seq=self.ledger.next_seq(), open_tasks=[t for t, _ in self.ledger.open_tasks()])
        for p in self.auth.clients():
            try:
                self.coord.register(p.client_id, checked_capabilities(p.caps))
            except UserError as e:  # the tiers changed since it joined
                log.warning("client %s no longer fits this federation (%s): removed; it must join again",
                            p.client_id, e)
                self.auth.forget(p.client_id)
        self.last_seen: dict[str, float] = {}
        self.committer = Committer(self.store, agg)
        self._decoders = ThreadPoolExecutor(DECODERS, thread_name_prefix="stamen-decode")
        self._committing: dict[str, asyncio.Future] = {}  # task id → its upload's commit, until applied
        self._applied: list[_Applied] = []  # the batch's updates applied, for the ledger, written per batch
        self._issuing: list[tuple[Task, str, asyncio.Future]] = []  # polled tasks whose rows are next written
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="stamen-eval")
        self._scoring: asyncio.Future | None = None
        self._score_after = 0.0  # monotonic time before which no new scoring starts
        scored = [r["version"] for r in self.ledger.evaluations()]
        self._scored = max(scored, default=-1)  # the newest version scored
        if self.evaluator and self.coord.version not in scored:
            # the starting point (a new federation's v0, or where a restart resumes), scored
            # before the server serves, so every history starts with it
            self._record(self.evaluator.score(self.coord.version, self.coord.weights))
            self._scored = self.coord.version

    # --- join and tasks -----------------------------------------------------------------
    def join(self, join_token: str, caps: dict, now: float) -> dict:
        c = checked_capabilities(caps)
        # The coordinator judges the join inside auth's, after the token and before any write:
        # a refused join leaves no client record behind (which a restart would then trip on).
        principal, token = self.auth.join(join_token, c.to_dict(), now, check=lambda role: self.coord.tier_for(c))
        a = self.coord.register(principal.client_id, c)
        log.info(f"client {principal.client_id} joined: {principal.role}, tier {a.tier}, "
                 f"{c.memory_bytes / 2**20:,.0f} MiB, runtimes {', '.join(c.runtimes)}")
        answer = {"client_id": principal.client_id, "token": token, "tier": a.tier, "plan": a.plan.to_dict(),
                  "model": self.spec.name}
        if self.lora is not None:
            answer["lora"] = self.lora.describe()  # the client builds the same adapter over its copy of the base
        return answer

    def principal(self, bearer: str | None, now: float) -> Principal:
        p = self.auth.principal(bearer)
        if p.client_id:
            self.last_seen[p.client_id] = now
        return p

    async def task(self, p: Principal, now: float) -> Task | None:
        """The client's task (a new one, or the one it holds), or None: none is free now. It is
        answered only once its ledger row is written (``_issue``)."""
        if p.role == "admin":
            raise RequestError("an admin token does not train", 403)
        self._expire(now)
        held = self.coord.held(p.client_id)
        task = self.coord.next_task(p.client_id, now)
        # A new task is written to the ledger; one held already was, unless that write failed.
        if task is not None and (task is not held or self.ledger.get(task.task_id) is None):
            await self._issue(task)
        return task

    def _issue(self, task: Task) -> asyncio.Future:
        """Write ``task``'s ledger row with every other task issued in this step of the event
        loop, in one transaction (``_write_issued``): a burst of polls (1,000 clients asking at
        once) pays one commit, not one each. The future fails, and the poll with it, if the
        write does."""
        loop = asyncio.get_running_loop()
        if not self._issuing:
            loop.call_soon(self._write_issued)
        done = loop.create_future()
        self._issuing.append((task, self.coord.assignment(task.client_id).tier, done))
        return done

    def _write_issued(self) -> None:
        batch, self._issuing = self._issuing, []
        try:
            self.ledger.issued([(task, tier) for task, tier, _ in batch])
        except Exception as e:  # nothing of the batch was written: each of its polls fails
            for *_, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        for *_, done in batch:
            if not done.done():
                done.set_result(None)

    def _expire(self, now: float) -> None:
        lapsed = self.coord.expire(now)
        if lapsed:
            self.ledger.lapsed([t.task_id for t in lapsed])

    # --- weights and bundles ------------------------------------------------------------
    def plan_for(self, p: Principal, plan_hash: str) -> Plan:
        """A plan the caller may download (weights or bundle): devices only their own, which
        also keeps a device from making the server export bundles nobody trains."""
        plan = self.coord.plan(plan_hash)
        if p.role == "device" and plan.hash not in self.coord.plan_hashes(self.coord.assignment(p.client_id).tier):
            raise RequestError("a device may download only its own plans (its tier's)", 403)
        return plan

    def weights(self, p: Principal, version: int, plan_hash: str, have: int | None) -> bytes:
        """The plan's slice of version ``version`` (``Coordinator.download``)."""
        return self.coord.download(self.plan_for(p, plan_hash), version, have)

    # --- updates ------------------------------------------------------------------------
    async def submit(self, p: Principal, task_id: str, body: bytes, now: float, next_task: bool = False) -> dict:
        """Admit (every rule is the coordinator's; a large upload decoded on a worker thread),
        journal with the next group commit, then apply and acknowledge. The task is looked at
        again after the decode: it may have lapsed, or a re-send of it may have been committed
        meanwhile. ``next_task``: the answer also carries the client's next task when one is
        free (``task``), issued once the update is applied."""
        task = self.coord.open_task(task_id)  # an open task is in memory: no ledger read on the hot path
        if task is None:
            entry = self.ledger.get(task_id)
            if entry is None:
                raise RequestError(f"unknown task {task_id!r}", 404)
            if entry.status == "done":
                if entry.task.client_id != p.client_id:
                    raise RequestError(f"task {task_id!r} belongs to another client", 403)
                return await self._duplicate(p, now, next_task)
            task = entry.task
        self._expire(now)
        try:
            if not self.coord.open(p.client_id, task):
                return await self._duplicate(p, now, next_task)
            if len(body) <= INLINE_DECODE_BYTES:
                update, loss = self.coord.decode(task, body)
            else:
                update, loss = await asyncio.get_running_loop().run_in_executor(
                    self._decoders, self.coord.decode, task, body)
            if task_id in self._committing:  # a re-send raced the first upload: answer as it is answered
                await self._committing[task_id]  # the committer's future: no waiter can cancel it
                return await self._duplicate(p, time.time(), next_task)
            if not self.coord.open(p.client_id, task):
                return await self._duplicate(p, time.time(), next_task)
            admitted = self.coord.judge(update, loss)
        except StaleUpdate:
            self.ledger.lapsed([task_id])  # the coordinator closed it: never mergeable now
            raise
        row = self.store.row(update, now, body)  # journaled as uploaded: replay decodes it again
        then = p if next_task else None
        committed = self.committer.commit(row, lambda: self._accept(admitted, row, then))
        self._committing[task_id] = committed  # until it is applied, even if this request is cancelled
        committed.add_done_callback(lambda _: self._committing.pop(task_id, None))
        try:
            return await committed
        except (OSError, sqlite3.Error) as e:
            raise RequestError(f"the server could not store the update ({e}); send it again later", 503) from None

    async def _duplicate(self, p: Principal, now: float, next_task: bool) -> dict:
        """The answer to a re-sent upload (its update was accepted already)."""
        answer = {"status": "duplicate", "version": self.coord.version}
        task = await self.task(p, now) if next_task else None
        if task is not None:
            answer["task"] = task.to_dict()
        return answer

    def _accept(self, admitted: Admitted, row: Row, then: Principal | None = None) -> dict:
        """Apply a durable update row (the committer calls this in journal order); ``then``:
        the client to issue a next task to once the batch is applied."""
        task_id = admitted.update.task_id
        try:
            accepted = self.coord.accept(admitted, row.at, lambda agg, update, now: self.store.apply(agg, row))
        except StaleUpdate:  # a flush ahead of it in the journal made it too stale; the task is closed
            self.ledger.lapsed([task_id])
            raise
        if not self._applied:  # once the committer's batch is applied, before any of its answers goes out
            asyncio.get_running_loop().call_soon(self._record_applied)
        answer = {"status": "accepted", "version": accepted.version}
        self._applied.append(_Applied(task_id, admitted.update.tokens, admitted.loss, then, answer))
        if accepted.report is not None:
            self._published(accepted.report)
        return answer

    def _record_applied(self) -> None:
        """Once a batch is applied, before any of its answers goes out: issue the next tasks its
        clients asked for (at the version the whole batch made, as ``GET /v1/task`` would), and
        write the ledger's rows for the batch in one transaction: its updates done, those tasks
        issued. A task goes into its answer only once its row is written (a restart must know
        it, or its upload would be refused); if the write fails, the answers carry none and
        their clients ask again (``GET /v1/task`` gives each the task it holds). A crash before
        the write loses nothing: the journal holds the updates, and ``Ledger.reconcile`` marks
        them done at start-up."""
        applied, self._applied = self._applied, []
        now, issued = time.time(), []
        self._expire(now)
        for a in applied:
            if a.then is not None:
                task = self.coord.next_task(a.then.client_id, now)
                if task is not None:
                    issued.append((a, task))
        records = [task.to_dict() for _, task in issued]  # made once: the ledger's row and the answer
        self.ledger.record([(a.task_id, a.tokens, a.loss) for a in applied],
                           [(task, self.coord.assignment(task.client_id).tier, d) for (_, task), d in zip(issued, records)])
        for (a, _), d in zip(issued, records):
            a.answer["task"] = d

    def release(self, p: Principal, task_id: str) -> dict:
        """The client gives its task back (it is stopping: Ctrl-C, ``flwr stop``): the task
        closes now instead of at its deadline, so it no longer counts as in flight and its
        work goes to whoever asks next. Releasing a task that is already closed (uploaded,
        lapsed, released) changes nothing, so a re-sent release is harmless."""
        entry = self.ledger.get(task_id)
        if entry is None:
            raise RequestError(f"unknown task {task_id!r}", 404)
        if not self.coord.release(p.client_id, entry.task):
            return {"status": entry.status}
        self.ledger.released(task_id)
        return {"status": "released"}

    def _published(self, report: FlushReport) -> None:
        """Record a new version, log one line for it, and have it scored."""
        self.ledger.set_meta("global_step", self.coord.global_step)
        log.info(f"version {report.version}: {report.updates} updates, {report.tokens:,} tokens, mean staleness "
                 f"{report.mean_staleness:.2f}, coverage {report.coverage:.0%}, |Δθ| {report.update_norm:.4g} "
                 f"(flushed by {report.reason})")
        self._score_newest()

    def _score_newest(self) -> None:
        """Score the current version on the held-out set, on the evaluation thread, if it is an
        Nth one (``[evaluation] every``) not yet scored, no scoring is running, and the last
        one has rested: scoring takes at most ``EVAL_SHARE`` of the wall time. Scored inline,
        it held every request for its length (~60% of the server's time at 1,000 clients);
        versions published while the thread is busy or resting are skipped, and ``poll``
        comes back within a second for the newest, so the newest version is always scored."""
        v = self.coord.version
        if (self.evaluator is None or v % self.fed.evaluation.every or v <= self._scored
                or (self._scoring is not None and not self._scoring.done()) or time.monotonic() < self._score_after):
            return
        self._scored = v
        run = self.evaluator.prepare(v, self.coord.weights)  # copies the weights: publishing goes on
        self._scoring = asyncio.get_running_loop().run_in_executor(self._scorer, run)
        self._scoring.add_done_callback(self._scored_one)

    def _scored_one(self, job: asyncio.Future) -> None:
        if job.cancelled():
            return
        if job.exception() is not None:
            log.error("scoring version %d failed: %s", self._scored, job.exception())
            return
        e = job.result()
        self._score_after = time.monotonic() + e.wall_s * (1 / EVAL_SHARE - 1)
        self._record(e)

    def _record(self, e: Evaluation) -> None:
        self.ledger.evaluated(e.version, e.val_loss, e.tokens, e.wall_s, e.at)
        log.info(f"version {e.version}: validation loss {e.val_loss:.4f} on {e.tokens:,} held-out tokens "
                 f"of {self.evaluator.source} ({e.wall_s:.2f} s)")

    async def poll(self, now: float) -> None:
        """Periodic work: lapse overdue tasks, publish after the max wait (journaled first),
        score the newest version if it was skipped."""
        self._expire(now)
        self._score_newest()
        if self.coord.flush_due(now):
            row = self.store.row(None, now)
            await self.committer.commit(row, lambda: self._flushed(row))

    def _flushed(self, row: Row) -> None:
        report = self.coord.poll(row.at, lambda agg, now: self.store.apply(agg, row))
        if report is not None:
            self._published(report)

    # --- reporting ----------------------------------------------------------------------
    def status(self, public: bool = False) -> dict:
        """The operator's view; ``public``: aggregate figures only (no per-client rows)."""
        per_client, per_tier = self.ledger.tokens_by("client_id"), self.ledger.tokens_by("tier")
        covered: set[str] = set()
        for plan_json in self.ledger.done_plans():
            covered |= set(Plan.from_json(plan_json).trainable(self.cfg))
        names = list(global_shapes(self.cfg))
        clients = []
        for a in self.coord.clients():
            updates, tokens = per_client.get(a.client_id, (0, 0))
            clients.append({"client_id": a.client_id, "role": a.caps.role, "tier": a.tier, "plan": a.plan.hash,
                            "updates": updates, "tokens": tokens, "last_seen": self.last_seen.get(a.client_id)})
        out = {
            "model": self.spec.name, "version": self.coord.version, "global_step": self.coord.global_step,
            "buffered": self.coord.buffered, "tasks": self.ledger.counts(), "in_flight": self.coord.in_flight,
            "tiers": {t: {"updates": n, "tokens": k} for t, (n, k) in sorted(per_tier.items())},
            "client_count": len(clients), "clients": clients,
            "evaluations": self.ledger.evaluations(),
            # a LoRA federation scores response tokens of its base's tokenizer, not bytes
            "loss_unit": "nats/response token" if self.lora else "nats/byte",
            "tensors": {"total": len(names), "covered": sum(n in covered for n in names),
                        "uncovered": [n for n in names if n not in covered]},
        }
        privacy = self.coord.privacy()
        if privacy is not None:
            out["privacy"] = privacy
        if public:
            out["clients"] = []
        return out

    async def drain(self) -> None:
        """Wait for the journal's queued rows, any checkpoint being written and any scoring."""
        await self.committer.drain()
        if self._scoring is not None:
            await asyncio.gather(self._scoring, return_exceptions=True)

    def close(self) -> None:
        """Checkpoint and close (after ``drain``): a restart then resumes without replaying the
        journal. A checkpoint that fails here loses nothing: the restart replays the journal."""
        try:
            self.store.checkpoint(self.coord.aggregator)
        except OSError as e:
            log.warning("final checkpoint failed (%s); the next start replays the journal", e)
        if self._applied:  # the last batch's, if its callback did not run
            self._record_applied()
        self.committer.close()
        self._decoders.shutdown()
        self._scorer.shutdown()
        self.store.close()
        self.auth.close()
        self.ledger.close()
        self._lock.close()
