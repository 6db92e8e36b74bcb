"""The federation behind the HTTP routes: join, task, weights, update, status — as plain
methods that take bytes and return bytes/dicts, so every rule is testable without a socket and
``app.py`` stays a thin translation to HTTP.

An update is checked completely (token, ownership, task state, bounded decode against the
task's plan manifest, staleness, values) before anything changes; then it is journaled by the
store, and only then applied and acknowledged. A request that fails any check changes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from stamen.compression.codecs import decode, encode
from stamen.core.errors import UserError
from stamen.core.model import ModelSpec, weights
from stamen.core.plan import Plan, full_plan, global_shapes
from stamen.core.records import Capabilities, Task, Update
from stamen.core.wire import FrameTooLarge, Limits, WireError
from stamen.server.aggregator import BadUpdate, StaleUpdate
from stamen.server.auth import Auth, Principal, Unauthorized
from stamen.server.config import FederationConfig
from stamen.server.ledger import Ledger
from stamen.server.scheduler import Scheduler
from stamen.server.store import Store

WEIGHTS_CODEC = "fp32+zstd(1)"  # weights must arrive exact: clients compute Δ against them


class RequestError(UserError):
    """A request the server refuses, with its HTTP status and a reason."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


def http_status(e: UserError) -> int:
    """The 4xx for a refused request."""
    if isinstance(e, RequestError):
        return e.status
    if isinstance(e, Unauthorized):
        return 401
    if isinstance(e, StaleUpdate):
        return 409
    if isinstance(e, FrameTooLarge):
        return 413
    if isinstance(e, (BadUpdate, WireError)):
        return 422
    return 400


class Federation:
    def __init__(self, model: str, state_dir: str | Path, fed: FederationConfig, seed: int = 0) -> None:
        spec = ModelSpec(model)
        cfg = spec.gpt_config()
        if cfg is None:
            raise UserError(f"model {model!r} is not a GPT: the HTTP federation serves GPT-family models")
        self.spec, self.cfg, self.fed = spec, cfg, fed
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.auth, self.ledger = Auth(state), Ledger(state)
        self.store = Store(state, checkpoint_every=fed.server.checkpoint_every)
        torch.manual_seed(seed)  # the initial model of a new federation; a resumed one ignores it
        self.agg = self.store.start(cfg, weights(spec.build()), fed.aggregator_config())
        self.ledger.reconcile(set(self.store.journaled_task_ids()))
        self.scheduler = Scheduler(cfg, fed, seed, global_step=self.ledger.get_meta("global_step"),
                                   next_seq=self.ledger.next_seq())
        for task, _ in self.ledger.open_tasks():
            self.scheduler.restore_task(task)
        for p in self.auth.clients():
            self.scheduler.register(p.client_id, Capabilities.from_dict(p.caps))
        self.plans: dict[str, Plan] = {p.hash: p for p in self.scheduler.plans.values()}
        self.plans.setdefault(full_plan(cfg).hash, full_plan(cfg))
        self.last_seen: dict[str, float] = {}

    # --- join and tasks -----------------------------------------------------------------
    def join(self, join_token: str, caps: dict) -> dict:
        try:
            c = Capabilities.from_dict(caps)
        except (TypeError, ValueError) as e:
            raise RequestError(f"bad capabilities: {e}") from None
        if not (isinstance(c.memory_bytes, int) and c.memory_bytes > 0 and isinstance(c.flops, (int, float)) and c.flops > 0):
            raise RequestError("capabilities need a positive integer memory_bytes and positive flops")
        self.scheduler.tier_for(c)  # refuse before a client record is written
        principal, token = self.auth.join(join_token, c.to_dict())
        a = self.scheduler.register(principal.client_id, c)
        return {"client_id": principal.client_id, "token": token, "tier": a.tier, "plan": a.plan.to_dict(),
                "model": self.spec.name}

    def principal(self, bearer: str | None, now: float) -> Principal:
        p = self.auth.principal(bearer)
        if p.client_id:
            self.last_seen[p.client_id] = now
        return p

    def task(self, p: Principal, now: float) -> Task | None:
        if p.role == "admin":
            raise RequestError("an admin token does not train", 403)
        self._expire(now)
        task = self.scheduler.next_task(p.client_id, self.agg.version, now)
        if task is not None and self.ledger.get(task.task_id) is None:
            self.ledger.issued(task, self.scheduler.clients[p.client_id].tier)
        return task

    def _expire(self, now: float) -> None:
        lapsed = self.scheduler.expire(now)
        if lapsed:
            self.ledger.lapsed([t.task_id for t in lapsed])

    # --- weights and bundles ------------------------------------------------------------
    def plan_for(self, p: Principal, plan_hash: str) -> Plan:
        """A plan the caller may download (weights or bundle): devices only their own, which
        also keeps a device from making the server export bundles nobody trains."""
        plan = self.plans.get(plan_hash)
        if plan is None:
            raise RequestError(f"unknown plan {plan_hash!r}", 404)
        if p.role == "device" and plan.hash != self.scheduler.clients[p.client_id].plan.hash:
            raise RequestError("a device may download only its own plan", 403)
        return plan

    def weights(self, p: Principal, version: int, plan_hash: str, have: int | None) -> bytes:
        """The plan's slice of version ``version``, exact; as the difference from version
        ``have`` when the client holds it (frozen and unchanged tensors then cost nearly
        nothing after zstd), else whole."""
        plan = self.plan_for(p, plan_hash)
        target = self._version(version)
        sub = plan.extract(target, self.cfg)
        meta = {"version": version, "plan": plan.hash, "base": -1}
        if have is not None and have != version:
            old = plan.extract(self._version(have), self.cfg)
            sub = {n: sub[n] - old[n] for n in sub}
            meta["base"] = have
        return encode(sub, WEIGHTS_CODEC, kind="weights" if meta["base"] < 0 else "delta", meta=meta)

    def _version(self, version: int) -> dict[str, torch.Tensor]:
        try:
            return self.agg.weights_at(version)
        except BadUpdate as e:
            raise RequestError(str(e), 410) from None

    # --- updates ------------------------------------------------------------------------
    def submit(self, p: Principal, task_id: str, body: bytes, now: float) -> dict:
        entry = self.ledger.get(task_id)
        if entry is None:
            raise RequestError(f"unknown task {task_id!r}", 404)
        task = entry.task
        if task.client_id != p.client_id:
            raise RequestError(f"task {task_id!r} belongs to another client", 403)
        if entry.status == "done" or task_id in self.agg.seen:
            return {"status": "duplicate", "version": self.agg.version}
        if entry.status == "lapsed" or task_id not in self.scheduler.in_flight:
            raise RequestError(f"task {task_id!r} is closed (its deadline passed, or its update was refused "
                               "as stale): ask for a new task", 410)
        shapes = task.plan.shapes(self.cfg)
        manifest = {n: shapes[n] for n in task.plan.trainable(self.cfg)}
        limits = Limits(max_compressed_bytes=self.fed.server.max_body_mib << 20,
                        max_decompressed_bytes=8 * sum(math.prod(s) for s in manifest.values()) + 4096,
                        max_tensors=len(manifest), manifest=manifest)
        payload = decode(body, limits)
        if payload.kind != "update":
            raise RequestError(f"expected an update payload, got {payload.kind!r}", 422)
        most = task.steps * task.batch_size * task.seq_len
        tokens = payload.meta.get("tokens")
        if not (isinstance(tokens, int) and 0 < tokens <= most):
            raise RequestError(f"tokens must be an integer in [1, {most}] for this task, got {tokens!r}", 422)
        loss = payload.meta.get("loss")
        loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        update = Update(task_id, task.base_version, task.plan,
                        {n: t.to(torch.float32) for n, t in payload.tensors.items()}, tokens,
                        {} if loss is None else {"loss": loss})
        try:
            self.agg.check(update)  # stale (409) or bad (422): no update written, model unchanged
        except StaleUpdate:
            # Never mergeable now: close the task so the client's next poll gets fresh work.
            self.scheduler.abandon(task_id)
            self.ledger.lapsed([task_id])
            raise
        self.ledger.claim(task_id, tokens, loss)
        report = self.store.accept(self.agg, update, now)  # journaled durably, then applied
        self.scheduler.complete(task_id)
        self.ledger.done(task_id)
        if report is not None:
            self._published()
        return {"status": "accepted", "version": self.agg.version}

    def _published(self) -> None:
        self.ledger.set_meta("global_step", self.scheduler.published())

    def poll(self, now: float) -> None:
        """Periodic work: lapse overdue tasks, publish after the max wait."""
        self._expire(now)
        if self.store.poll(self.agg, now) is not None:
            self._published()

    # --- reporting ----------------------------------------------------------------------
    def status(self) -> dict:
        per_client, per_tier = self.ledger.tokens_by("client_id"), self.ledger.tokens_by("tier")
        covered: set[str] = set()
        for plan_json in self.ledger.done_plans():
            covered |= set(Plan.from_json(plan_json).trainable(self.cfg))
        names = list(global_shapes(self.cfg))
        clients = []
        for cid, a in self.scheduler.clients.items():
            updates, tokens = per_client.get(cid, (0, 0))
            clients.append({"client_id": cid, "role": a.caps.role, "tier": a.tier, "plan": a.plan.hash,
                            "updates": updates, "tokens": tokens, "last_seen": self.last_seen.get(cid)})
        return {
            "model": self.spec.name, "version": self.agg.version, "global_step": self.scheduler.global_step,
            "buffered": self.agg.buffer.count, "tasks": self.ledger.counts(), "in_flight": len(self.scheduler.in_flight),
            "tiers": {t: {"updates": n, "tokens": k} for t, (n, k) in sorted(per_tier.items())},
            "clients": clients,
            "tensors": {"total": len(names), "covered": sum(n in covered for n in names),
                        "uncovered": [n for n in names if n not in covered]},
        }

    def close(self) -> None:
        """Checkpoint and close: a restart then resumes without replaying the journal."""
        self.store.checkpoint(self.agg)
        self.store.close()
        self.auth.close()
        self.ledger.close()
