"""Durable server state: a SQLite ledger (WAL mode) plus safetensors checkpoints.

The journal is the truth. An update is acknowledged only after its row (payload included) is
committed with ``synchronous=FULL``, and only then applied to the aggregator; a time-driven
flush (``poll``) is journaled as a marker row before it happens. Everything else the
aggregator does is a deterministic function of that sequence, so ``restore()`` = load the
newest complete checkpoint + replay the journal rows after it = the exact state, bit for bit,
whatever instant the process died at. Checkpoints hold the model, the outer optimizer state,
the buffer (S, W and its counters) and the kept versions; they are written to a temp file,
fsynced and renamed into place, so a half-written one is never read. Payloads a checkpoint
covers are dropped from the journal (its task ids stay: they make re-sends idempotent).

Deltas are journaled as safetensors bytes (lossless: the codec has already been undone).
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file

from stamen.core.errors import UserError
from stamen.core.plan import Model, Plan
from stamen.core.records import Task, Update
from stamen.server.aggregator import Aggregator, AggregatorConfig, FlushReport

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,          -- the order of application
    kind TEXT NOT NULL,               -- 'update' or 'flush' (a max-wait flush)
    task_id TEXT UNIQUE,
    base_version INTEGER, plan TEXT, tokens INTEGER, metrics TEXT,
    payload BLOB,                     -- safetensors bytes of the delta; NULL once checkpointed
    at REAL NOT NULL                  -- the aggregator clock the row was applied at
);
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, report TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, task TEXT NOT NULL);
"""


class Store:
    """One server's durable state in directory ``root`` (``state.db``, ``checkpoints/``).
    ``checkpoint_every``: versions between automatic checkpoints (each costs a model write)."""

    def __init__(self, root: str | Path, checkpoint_every: int = 10) -> None:
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "state.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.checkpoint_every = checkpoint_every
        self.last_seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
        self._ckpt_version = -1

    def close(self) -> None:
        self.db.close()

    # --- the ledger -------------------------------------------------------------------------
    def accept(self, agg: Aggregator, update: Update, now: float) -> FlushReport | None:
        """Judge, journal durably, then apply. Raises StaleUpdate/BadUpdate with nothing
        written; a known task id is a no-op (the client re-sent after a lost answer)."""
        if update.task_id in agg.seen:
            return None
        agg.check(update)
        payload = save_tensors({n: t.contiguous() for n, t in update.delta.items()})
        self._journal("update", update.task_id, update.base_version, update.plan.to_json(), update.tokens,
                      json.dumps(update.metrics), payload, now)
        return self._after(agg, agg.submit(update, now))

    def poll(self, agg: Aggregator, now: float) -> FlushReport | None:
        """The aggregator's max-wait flush, journaled before it happens."""
        if not agg.due(now):
            return None
        self._journal("flush", None, None, None, None, None, None, now)
        return self._after(agg, agg.flush("wait"))

    def _journal(self, *row) -> None:
        seq = self.last_seq + 1
        with self.db:  # one transaction, committed (and fsynced: synchronous=FULL) on exit
            self.db.execute("INSERT INTO journal (seq, kind, task_id, base_version, plan, tokens, metrics, payload, at)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, *row))
        self.last_seq = seq

    def _after(self, agg: Aggregator, report: FlushReport | None) -> FlushReport | None:
        if report is not None:
            self._record_version(report)
            if report.version - max(self._ckpt_version, 0) >= self.checkpoint_every:
                self.checkpoint(agg)
        return report

    def _record_version(self, report: FlushReport) -> None:
        self.db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", (report.version, json.dumps(asdict(report))))

    def reports(self) -> list[FlushReport]:
        rows = self.db.execute("SELECT report FROM versions ORDER BY version").fetchall()
        return [FlushReport(**json.loads(r)) for (r,) in rows]

    def record_task(self, task: Task) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)",
                            (task.task_id, task.client_id, json.dumps(task.to_dict())))

    def task(self, task_id: str) -> Task | None:
        row = self.db.execute("SELECT task FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return Task.from_dict(json.loads(row[0])) if row else None

    def journaled_task_ids(self) -> list[str]:
        return [r for (r,) in self.db.execute("SELECT task_id FROM journal WHERE kind = 'update' ORDER BY seq")]

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint(self, agg: Aggregator) -> Path:
        """Write the aggregator's state as of journal row ``last_seq``; atomic and fsynced."""
        tensors, meta = agg.state()
        name = f"ckpt-{self.last_seq:012d}.safetensors"
        tmp = self.ckpt_dir / (name + ".tmp")
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp,
                  metadata={"meta": json.dumps(meta), "seq": str(self.last_seq), "config": _config_json(agg.config)})
        _fsync(tmp)
        os.replace(tmp, self.ckpt_dir / name)
        _fsync(self.ckpt_dir)
        with self.db:
            self.db.execute("UPDATE journal SET payload = NULL WHERE seq <= ? AND payload IS NOT NULL", (self.last_seq,))
        for old in self.ckpt_dir.iterdir():
            if old.name != name:
                old.unlink()
        self._ckpt_version = agg.version
        return self.ckpt_dir / name

    def start(self, cfg: Model, weights: dict[str, torch.Tensor], config: AggregatorConfig) -> Aggregator:
        """A new federation's aggregator at version 0, checkpointed; or, if this store already
        holds one, the restored aggregator."""
        if self._latest() is not None:
            return self.restore(cfg, config)
        agg = Aggregator(cfg, weights, config)
        self.checkpoint(agg)
        return agg

    def _latest(self) -> Path | None:
        done = sorted(p for p in self.ckpt_dir.glob("ckpt-*.safetensors"))
        return done[-1] if done else None

    def restore(self, cfg: Model, config: AggregatorConfig) -> Aggregator:
        """The exact aggregator state: the newest checkpoint, then the journal replayed."""
        path = self._latest()
        if path is None:
            raise UserError(f"no checkpoint in {self.ckpt_dir}: nothing to resume")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta["config"] != _config_json(config):
            raise UserError(f"the aggregator settings differ from the checkpoint's: {meta['config']}")
        seq = int(meta["seq"])
        seen = {r for (r,) in self.db.execute(
            "SELECT task_id FROM journal WHERE kind = 'update' AND seq <= ?", (seq,))}
        agg = Aggregator.from_state(cfg, config, tensors, json.loads(meta["meta"]), seen)
        self._ckpt_version = agg.version
        rows = self.db.execute("SELECT kind, task_id, base_version, plan, tokens, metrics, payload, at "
                               "FROM journal WHERE seq > ? ORDER BY seq", (seq,))
        for kind, task_id, base, plan, tokens, metrics, payload, at in rows:
            if kind == "flush":
                report = agg.flush("wait")
            else:
                update = Update(task_id, base, Plan.from_json(plan), load_tensors(payload), tokens, json.loads(metrics))
                report = agg.submit(update, at)
            if report is not None:
                self._record_version(report)
        return agg


def _config_json(config: AggregatorConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
