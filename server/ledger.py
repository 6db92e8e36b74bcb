"""The task ledger, ``<state>/tasks.db`` (SQLite): every task issued, to whom, in which tier,
and what became of it (open, done, lapsed, released), plus the scheduler's global step counter and
the history of held-out evaluations (one row per scored version).

It is what lets a restarted server recognise the uploads of tasks it issued before a crash,
answer a re-sent upload idempotently, and report per-client and per-tier token counts. The
model-side truth (which updates were applied) is the store's journal; ``reconcile`` brings the
ledger in line with it after a crash between the two writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from stamen.core.records import Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, client_id TEXT NOT NULL, tier TEXT NOT NULL,
                                  body TEXT NOT NULL, status TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0,
                                  loss REAL, issued REAL NOT NULL, closed REAL);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (version INTEGER PRIMARY KEY, val_loss REAL NOT NULL, tokens INTEGER NOT NULL,
                                        wall_s REAL NOT NULL, at REAL NOT NULL);
"""


TAILS = 256  # (plan, settings) JSON parts remembered; a tier has one of each


@dataclass(frozen=True)
class Entry:
    task: Task
    tier: str
    status: str  # "open", "done", "lapsed" or "released"


class Ledger:
    def __init__(self, state_dir: str | Path) -> None:
        self.db = sqlite3.connect(Path(state_dir) / "tasks.db", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not FULL: in WAL mode a commit survives the process being killed and only an
        # OS crash can roll back the last few; the store's journal (FULL) is the truth, and
        # ``reconcile`` restores what matters from it. This spares an fsync per request.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._tails: dict[tuple, str] = {}  # (plan, train settings) → their part of a task's row (``_body``)

    def issued(self, tasks: list[tuple[Task, str]]) -> None:
        """These (task, tier) were issued, in one transaction."""
        self.record([], [(t, tier, t.to_dict()) for t, tier in tasks])

    def evaluated(self, version: int, val_loss: float, tokens: int, wall_s: float, at: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?)", (version, val_loss, tokens, wall_s, at))

    def evaluations(self) -> list[dict]:
        rows = self.db.execute("SELECT version, val_loss, tokens, wall_s, at FROM evaluations ORDER BY version")
        return [{"version": v, "val_loss": loss, "tokens": n, "wall_s": w, "at": at} for v, loss, n, w, at in rows]

    def get(self, task_id: str) -> Entry | None:
        row = self.db.execute("SELECT body, tier, status FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else Entry(Task.from_dict(json.loads(row[0])), row[1], row[2])

    def done(self, applied: list[tuple[str, int, float | None]]) -> None:
        """These tasks' updates were applied: record each (task id, tokens, loss), in one transaction."""
        self.record(applied, [])

    def record(self, applied: list[tuple[str, int, float | None]], issued: list[tuple[Task, str, dict]]) -> None:
        """A journal batch's rows in one transaction (one commit, not one per row): the tasks
        whose updates were applied, done with their (task id, tokens, loss), and the (task,
        tier, its ``Task.to_dict()``, which the caller's answer reuses) issued after them.
        Raises, having written nothing, if the commit fails."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            if applied:
                self.db.executemany("UPDATE tasks SET status = 'done', tokens = ?, loss = ?, closed = ? WHERE id = ?",
                                    [(tokens, loss, now, task_id) for task_id, tokens, loss in applied])
            if issued:
                self.db.executemany("INSERT OR IGNORE INTO tasks (id, client_id, tier, body, status, issued) "
                                    "VALUES (?, ?, ?, ?, 'open', ?)",
                                    [(t.task_id, t.client_id, tier, self._body(t, d), now) for t, tier, d in issued])

    def _body(self, task: Task, record: dict) -> str:
        """A task's row, ``record`` as JSON: the plan's and the training settings' part (most of
        its text, and the same for every task of a tier) encoded once per (plan, settings) and
        joined to the task's own fields. It reads back as the same record (``Task.from_dict``)."""
        key = (task.plan, task.train)
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) >= TAILS:
                self._tails.clear()
            tail = self._tails[key] = f', "plan": {json.dumps(record["plan"])}, "train": {json.dumps(record["train"])}}}'
        return json.dumps({k: v for k, v in record.items() if k not in ("plan", "train")})[:-1] + tail

    def lapsed(self, task_ids: list[str]) -> None:
        self.db.executemany("UPDATE tasks SET status = 'lapsed', closed = ? WHERE id = ? AND status = 'open'",
                            [(time.time(), t) for t in task_ids])

    def released(self, task_id: str) -> None:
        """The client gave the task back before uploading (it stopped)."""
        self.db.execute("UPDATE tasks SET status = 'released', closed = ? WHERE id = ? AND status = 'open'",
                        (time.time(), task_id))

    def open_tasks(self) -> list[tuple[Task, str]]:
        rows = self.db.execute("SELECT body, tier FROM tasks WHERE status = 'open' ORDER BY id").fetchall()
        return [(Task.from_dict(json.loads(b)), tier) for b, tier in rows]

    def reconcile(self, journaled: dict[str, tuple[int, float | None]]) -> None:
        """Mark done, with the figures the store journaled, every open task whose update the
        store journaled: the process died between the store's commit and ours."""
        self.done([(task.task_id, *journaled[task.task_id]) for task, _ in self.open_tasks() if task.task_id in journaled])

    def tokens_by(self, column: str) -> dict[str, tuple[int, int]]:
        """(updates, tokens) of done tasks per ``client_id`` or ``tier``."""
        assert column in ("client_id", "tier")
        rows = self.db.execute(f"SELECT {column}, COUNT(*), SUM(tokens) FROM tasks WHERE status = 'done' GROUP BY {column}")
        return {k: (n, int(t)) for k, n, t in rows}

    def done_plans(self) -> list[str]:
        """The distinct plans (JSON) of done tasks: what the federation has trained."""
        rows = self.db.execute("SELECT DISTINCT json_extract(body, '$.plan') FROM tasks WHERE status = 'done'")
        return [r[0] for r in rows]

    def next_seq(self) -> int:
        """One past the highest task number issued (task ids are ``t`` + a zero-padded number)."""
        row = self.db.execute("SELECT MAX(id) FROM tasks").fetchone()
        return 0 if row[0] is None else int(row[0][1:]) + 1

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())

    def get_meta(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_meta(self, key: str, value: int) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def close(self) -> None:
        self.db.close()
