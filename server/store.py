"""Durable server state: a SQLite journal (WAL mode) plus safetensors checkpoints.

The journal is the truth. An update is acknowledged only after its row (payload included) is
committed with ``synchronous=FULL``, and only then applied to the aggregator, in journal order;
a time-driven flush (``poll``) is journaled as a marker row before it happens. Everything else
the aggregator does is a deterministic function of that sequence, so ``restore()`` = load the
newest readable checkpoint + replay the journal rows after it = the exact state, bit for bit,
whatever instant the process died at. Rows are written in batches (``write``): the server's
committer (``server/committer.py``) puts every row that arrived during one commit into the
next, so one fsync makes many updates durable; each is still applied and acknowledged only
after its own batch is durable.

An update's staleness is judged when it is applied, not when it was journaled: an update that
a flush ahead of it in the journal made too stale is refused (HTTP 409) although its row is
kept, and replay refuses it the same way, so live and restored states agree.

Checkpoints hold the model, the outer optimizer state, the buffer (S, W and its counters) and
the kept versions as of one applied journal row; each file is written to a temp file, fsynced
and renamed into place, so a half-written one is never read. The newest two are kept, and the
journal keeps the payloads after the older one: if the newest cannot be read (truncated,
corrupt), ``restore`` sets it aside and falls back to the previous one plus a longer replay.
A checkpoint that fails to write (disk full) loses nothing: the journal still holds every row
after the last good one, and the next checkpoint tries again.

A kept older version v is stored as the tensors in which it differs from v + 1 (copy-on-write:
the rest are v + 1's), which never change once v + 1 is published; so each is written once, by
the first checkpoint that holds it: the versions no kept checkpoint holds yet go into one file
(``checkpoints/versions/<first>-<last>.safetensors``), and the checkpoint file
(``ckpt-<seq>.safetensors``, format 2) holds the rest and maps each kept older version to its
file in its metadata (``versions``). Rewriting every kept version's tensors at each checkpoint
had made a checkpoint's size grow with τ_max (at the bench's τ_max = 64, 15.7 MB a checkpoint,
12.8 of it the old versions'); a file per version instead cost as much again in per-file work
(ten files a checkpoint). Order: the new versions' file (temp, fsync, rename), its folder
fsynced, then the checkpoint file, then the version files no kept checkpoint names are deleted:
a crash at any point leaves every kept checkpoint's files in place. A version file is reused
only when a kept checkpoint names it (so it is complete and of this journal's history); any
other is written again. Checkpoints of format 1 (every kept version inline, no ``format`` key)
are still read.

An update is journaled as the bytes its client uploaded (a wire frame the server has already
checked), so a batch costs the disk no more than the uploads themselves; replay decodes them
again, which is deterministic. An update without an upload (``Store.accept``'s callers) is
journaled as a lossless fp32 frame.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import IO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from stamen.compression.codecs import decode, encode
from stamen.core.errors import UserError
from stamen.core.plan import Model, Plan
from stamen.core.records import Update
from stamen.server.aggregator import Aggregator, AggregatorConfig, FlushReport, StaleUpdate, versions_in_state

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,          -- the order of application
    kind TEXT NOT NULL,               -- 'update' or 'flush' (a max-wait flush)
    task_id TEXT UNIQUE,
    base_version INTEGER, plan TEXT, tokens INTEGER, metrics TEXT,
    payload BLOB,                     -- the update's wire frame; NULL once two checkpoints cover it
    at REAL NOT NULL                  -- the aggregator clock the row was applied at
);
"""
JOURNAL_CODEC = "fp32"  # how an update that arrived without its upload's bytes is journaled (lossless)
KEEP = 2  # checkpoints kept: the newest, and one to fall back to
FORMAT = "2"  # checkpoint files: 1 held every kept version inline; 2 names its versions' files
VERSIONS = "versions"  # the checkpoints' folder of version files
BUSY_MS = 30_000  # how long a write waits for another connection's write to finish


@dataclass(frozen=True)
class Row:
    """One journal row: an update (with ``body``, the upload it was decoded from, if any), or
    (``update`` None) a max-wait flush marker."""

    seq: int
    at: float
    update: Update | None = None
    body: bytes | None = None


@dataclass(frozen=True)
class Snapshot:
    """An aggregator's state as of journal row ``seq``, detached from the live aggregator:
    ``versions`` holds each kept older version's tensors that differ from the next version's,
    ``tensors`` the rest."""

    seq: int
    version: int
    tensors: dict[str, torch.Tensor]
    versions: dict[int, dict[str, torch.Tensor]]
    metadata: dict[str, str]


def lock_state(root: str | Path) -> IO:
    """Hold ``root`` for this process (an exclusive ``flock`` on ``root/lock``, released when the
    process ends): a second server on the same folder would overwrite the first's checkpoints.
    Raises UserError, having changed nothing, when another process holds it."""
    path = Path(root) / "lock"
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"state folder {root} is in use by another stamen server") from None
    return handle


class Store:
    """One server's durable state in directory ``root`` (``state.db``, ``checkpoints/``).
    ``checkpoint_every``: versions between automatic checkpoints (each costs a model write).

    Thread use: ``write`` and ``write_checkpoint`` may run on worker threads (one of each at a
    time); everything else runs on the caller's (the event loop's) thread."""

    def __init__(self, root: str | Path, checkpoint_every: int = 10) -> None:
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.db = self._connect("FULL")
        self.db.executescript(SCHEMA)
        self.checkpoint_every = checkpoint_every
        self.last_seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0]
        self.applied_seq = self.last_seq  # the last row applied to the aggregator
        self._ckpt_version = -1  # the version of the last checkpoint written or being written
        self._plan_json: dict[Plan, str] = {}  # a plan's journal column, made once per plan

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "state.db", isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    def close(self) -> None:
        self.db.close()

    # --- the journal ------------------------------------------------------------------------
    def row(self, update: Update | None, now: float, body: bytes | None = None) -> Row:
        """The next journal row (an update and the upload it came from, or a flush marker for
        None); ``write`` makes it durable."""
        self.last_seq += 1
        return Row(self.last_seq, now, update, body)

    def write(self, rows: list[Row]) -> None:
        """Commit ``rows`` in one transaction: one fsync (``synchronous=FULL``) for all of them.
        Pure apart from the database, so it may run on a worker thread."""
        values = []
        for r in rows:
            u = r.update
            if u is None:
                values.append((r.seq, "flush", None, None, None, None, None, None, r.at))
            else:
                payload = r.body if r.body is not None else encode(u.delta, JOURNAL_CODEC, meta={"tokens": u.tokens})
                plan = self._plan_json.get(u.plan)
                if plan is None:
                    plan = self._plan_json[u.plan] = u.plan.to_json()
                values.append((r.seq, "update", u.task_id, u.base_version, plan, u.tokens,
                               json.dumps(u.metrics), payload, r.at))
        # An explicit transaction: in autocommit mode (isolation_level=None) ``with db`` opens
        # none, and every INSERT would be its own commit and fsync.
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT INTO journal (seq, kind, task_id, base_version, plan, tokens, metrics, payload, at)"
                                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            self.db.execute("COMMIT")  # one fsync (synchronous=FULL) for the whole batch
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT may have rolled back already
                self.db.execute("ROLLBACK")
            raise

    def apply(self, agg: Aggregator, row: Row) -> FlushReport | None:
        """Apply a durable row: the update (StaleUpdate if a flush ahead of it in the journal made
        it too stale: replay refuses it the same way), or the max-wait flush if still due."""
        self.applied_seq = row.seq
        return _apply(agg, row)

    def accept(self, agg: Aggregator, update: Update, now: float) -> FlushReport | None:
        """Judge, journal durably, apply and checkpoint when due, one update at a time (the
        server batches through its committer instead). Raises StaleUpdate/BadUpdate with nothing
        written; a known task id is a no-op (the client re-sent after a lost answer)."""
        if update.task_id in agg.seen:
            return None
        agg.check(update)
        return self._commit(agg, self.row(update, now))

    def poll(self, agg: Aggregator, now: float) -> FlushReport | None:
        """The aggregator's max-wait flush, journaled before it happens."""
        if not agg.due(now):
            return None
        return self._commit(agg, self.row(None, now))

    def _commit(self, agg: Aggregator, row: Row) -> FlushReport | None:
        self.write([row])
        report = self.apply(agg, row)
        if self.checkpoint_due(agg):
            try:
                self.checkpoint(agg)
            except OSError as e:
                log.warning("checkpoint failed (%s); the journal keeps every update since the last one", e)
        return report

    def journaled_figures(self) -> dict[str, tuple[int, float | None]]:
        """Each journaled update's task id → (tokens, reported loss or None)."""
        rows = self.db.execute("SELECT task_id, tokens, metrics FROM journal WHERE kind = 'update'")
        return {t: (n, json.loads(m).get("loss")) for t, n, m in rows}

    def journaled_task_ids(self) -> list[str]:
        return [r for (r,) in self.db.execute("SELECT task_id FROM journal WHERE kind = 'update' ORDER BY seq")]

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint_due(self, agg: Aggregator) -> bool:
        return agg.version - max(self._ckpt_version, 0) >= self.checkpoint_every

    def snapshot(self, agg: Aggregator) -> Snapshot:
        """The aggregator's state as of the last applied row, safe to write from another thread
        while the aggregator moves on: the tensors it updates in place (optimizer state, S, W)
        are copied; weights and kept versions are copy-on-write (a flush makes new tensors), so
        they are shared."""
        state, meta = agg.state()
        tensors, versions = {}, {v: {} for v in meta["history"][:-1]}
        for k, t in state.items():
            group, rest = k.split("/", 1)
            if group == "hist":
                v, name = rest.split("/", 1)
                versions[int(v)][name] = t.contiguous()
            else:
                tensors[k] = t.clone() if group in ("opt", "S", "W") else t.contiguous()
        self._ckpt_version = agg.version
        return Snapshot(self.applied_seq, agg.version, tensors, versions,
                        {"meta": json.dumps(meta), "seq": str(self.applied_seq), "config": _config_json(agg.config),
                         "format": FORMAT})

    def write_checkpoint(self, snap: Snapshot) -> Path:
        """Write ``snap`` atomically (the kept versions no kept checkpoint holds yet to one file,
        then the checkpoint file: each a temp file, fsync, rename, fsync the folder), keep the
        newest ``KEEP`` checkpoints and the version files they name, and drop the journal
        payloads older than the oldest kept one: every kept checkpoint can still be replayed
        forward. May run on a worker thread.

        Written through safetensors' numpy API (the same file format; the aggregator's tensors
        are float32 and float64, views of the same memory): its torch API spent ~50 us of Python
        per tensor."""
        name = f"ckpt-{snap.seq:012d}.safetensors"
        versions = self.ckpt_dir / VERSIONS
        have = _version_files(self._checkpoints()[:KEEP])
        present = {f for f in set(have.values()) if (versions / f).is_file()}
        files = {v: have[v] for v in snap.versions if have.get(v) in present}
        new = [v for v in snap.versions if v not in files]
        if new:
            files |= dict.fromkeys(new, f"{new[0]:012d}-{new[-1]:012d}.safetensors")
            versions.mkdir(exist_ok=True)
            _put({f"{v}/{n}": t for v in new for n, t in snap.versions[v].items()}, versions / files[new[0]], {})
            _fsync(versions)
        _put(snap.tensors, self.ckpt_dir / name, snap.metadata | {"versions": json.dumps(files)})
        _fsync(self.ckpt_dir)
        kept = self._checkpoints()[:KEEP]
        for old in [*self.ckpt_dir.glob("ckpt-*.safetensors"), *self.ckpt_dir.glob("ckpt-*.tmp")]:
            if old not in kept:
                old.unlink()  # older checkpoints, and temp files a crash left behind
        if versions.is_dir():
            named = set(_version_files(kept).values())
            for old in versions.iterdir():
                if old.name not in named:
                    old.unlink()  # versions no kept checkpoint holds, and temp files
        covered = _seq_of(kept[-1])
        db = self._connect("NORMAL")  # its own connection: the journal's may be mid-commit on another thread
        try:
            with db:
                db.execute("UPDATE journal SET payload = NULL WHERE seq <= ? AND payload IS NOT NULL", (covered,))
        finally:
            db.close()
        return self.ckpt_dir / name

    def checkpoint(self, agg: Aggregator) -> Path:
        """Checkpoint the aggregator's state as of the last applied row, here and now."""
        return self.write_checkpoint(self.snapshot(agg))

    def _checkpoints(self) -> list[Path]:
        """Completed checkpoints, newest first."""
        return sorted(self.ckpt_dir.glob("ckpt-*.safetensors"), reverse=True)

    def start(self, cfg: Model, weights: dict[str, torch.Tensor], config: AggregatorConfig) -> Aggregator:
        """A new federation's aggregator at version 0, checkpointed; or, if this store already
        holds one, the restored aggregator."""
        if self._checkpoints():
            return self.restore(cfg, config)
        agg = Aggregator(cfg, weights, config)
        self.checkpoint(agg)
        return agg

    def restore(self, cfg: Model, config: AggregatorConfig) -> Aggregator:
        """The exact aggregator state: the newest readable checkpoint, then the journal replayed.
        A checkpoint that cannot be read is renamed ``*.unreadable`` (kept for inspection, never
        read again) and the previous one is used."""
        paths = self._checkpoints()
        if not paths:
            raise UserError(f"no checkpoint in {self.ckpt_dir}: nothing to resume")
        problems = []
        for path in paths:
            try:
                tensors, meta = _read(path)
            except (SafetensorError, OSError, ValueError, KeyError) as e:
                problems.append(f"{path.name}: {e}")
                log.warning("checkpoint %s cannot be read (%s): falling back to the previous one", path.name, e)
                path.rename(path.with_name(path.name + ".unreadable"))
                continue
            if meta["config"] != _config_json(config):
                raise UserError(f"the aggregator settings differ from the checkpoint's: {meta['config']}")
            seq = int(meta["seq"])
            lost = self.db.execute("SELECT COUNT(*) FROM journal WHERE seq > ? AND kind = 'update' AND payload IS NULL",
                                   (seq,)).fetchone()[0]
            if lost:
                problems.append(f"{path.name}: the journal no longer holds the {lost} updates after it")
                break
            return self._replay(cfg, config, tensors, meta, seq)
        raise UserError(f"cannot resume from {self.ckpt_dir}: " + "; ".join(problems))

    def _replay(self, cfg: Model, config: AggregatorConfig, tensors: dict[str, torch.Tensor],
                meta: dict[str, str], seq: int) -> Aggregator:
        self._ckpt_version = json.loads(meta["meta"])["version"]
        agg, self.applied_seq = _resume(self.db, cfg, config, tensors, meta, seq)
        return agg


def _apply(agg: Aggregator, row: Row) -> FlushReport | None:
    return agg.poll(row.at) if row.update is None else agg.submit(row.update, row.at)


def _resume(db: sqlite3.Connection, cfg: Model, config: AggregatorConfig, tensors: dict[str, torch.Tensor],
            meta: dict[str, str], seq: int) -> tuple[Aggregator, int]:
    """The aggregator a checkpoint (taken at journal row ``seq``) describes, with every journal
    row after it applied: (that aggregator, the last row applied)."""
    seen = {r for (r,) in db.execute("SELECT task_id FROM journal WHERE kind = 'update' AND seq <= ?", (seq,))}
    agg = Aggregator.from_state(cfg, config, tensors, json.loads(meta["meta"]), seen)
    rows = db.execute("SELECT seq, kind, task_id, base_version, plan, tokens, metrics, payload, at "
                      "FROM journal WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
    for seq, kind, task_id, base, plan, tokens, metrics, payload, at in rows:
        if kind == "update" and payload is None:  # two newer checkpoints were written meanwhile
            raise UserError("the server checkpointed twice while the journal was being read: run again")
        update = None if kind == "flush" else Update(task_id, base, Plan.from_json(plan), _delta(payload),
                                                     tokens, json.loads(metrics))
        try:
            _apply(agg, Row(seq, at, update))
        except StaleUpdate:
            pass  # refused when it was applied live, too (see the module docstring)
    return agg, seq


def _delta(payload: bytes) -> dict[str, torch.Tensor]:
    """A journaled update's delta, as the server applied it (float32, like ``service``'s decode)."""
    return {n: t.to(torch.float32) for n, t in decode(payload).tensors.items()}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's tensors (its version files' included, as ``Aggregator.state`` names them)
    and metadata; raises (SafetensorError, OSError, ValueError, KeyError) when the file or a
    version file it names is cut short, overwritten, missing or not one of ours, UserError when
    a newer stamen wrote it."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not meta or not {"meta", "seq", "config"} <= meta.keys():
        raise ValueError("no stamen metadata")
    json.loads(meta["meta"])
    int(meta["seq"])
    fmt = meta.get("format", "1")
    if fmt not in ("1", FORMAT):
        raise UserError(f"checkpoint {path} is of format {fmt}, newer than this stamen reads ({FORMAT}): upgrade stamen")
    if fmt == FORMAT:
        files: dict[str, list[str]] = {}
        for v, name in json.loads(meta["versions"]).items():
            files.setdefault(name, []).append(v)
        for name, held in files.items():
            with safe_open(str(path.parent / VERSIONS / name), framework="pt") as f:
                tensors |= {f"hist/{k}": f.get_tensor(k) for k in f.keys() if k.split("/", 1)[0] in held}
    return tensors, meta


def _version_files(checkpoints: list[Path]) -> dict[int, str]:
    """Each kept older version these checkpoints hold → the file it is in (a checkpoint whose
    header cannot be read names none: it will never be restored from)."""
    out: dict[int, str] = {}
    for path in checkpoints:
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
            if meta.get("format") == FORMAT:
                out |= {int(v): name for v, name in json.loads(meta["versions"]).items()}
        except (SafetensorError, OSError, ValueError, KeyError):
            continue
    return out


def _put(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temp file, fsynced, renamed to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: t.numpy() for k, t in tensors.items()}, tmp, metadata=metadata)
        _fsync(tmp)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)  # a full disk: free what the attempt took
        raise OSError(f"cannot write checkpoint {tmp}: {e}") from e
    os.replace(tmp, path)


def _seq_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


MODEL_FILE = "model.json"


def bind_model(state_dir: str | Path, model: str, lora: dict | None = None) -> None:
    """Record which model a state folder's federation trains (and, fine-tuning with LoRA, the
    adapter's space: ``LoraSpace.describe()``), or check it is the one recorded: a restart with
    another ``--model`` or ``[lora]`` would misread every checkpoint."""
    path = Path(state_dir) / MODEL_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded["model"] != model:
            raise UserError(f"{state_dir} holds a federation of {recorded['model']!r}, not {model!r}: "
                            f"pass --model {recorded['model']} or another --state")
        if recorded.get("lora") != lora:
            raise UserError(f"{state_dir} holds a federation with LoRA {recorded.get('lora')}, not {lora}: "
                            "use its [lora] settings or another --state")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model, **({"lora": lora} if lora else {})}) + "\n")
    os.replace(tmp, path)


def state_model(state_dir: str | Path) -> str:
    """The model a state folder's federation trains (``bind_model``)."""
    path = Path(state_dir) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{state_dir} holds no federation (no {MODEL_FILE}): pass the server's --state folder")
    return json.loads(path.read_text())["model"]


def state_lora(state_dir: str | Path) -> dict | None:
    """The adapter space a LoRA federation's state folder records (``bind_model``), or None."""
    state_model(state_dir)
    return json.loads((Path(state_dir) / MODEL_FILE).read_text()).get("lora")


def published_weights(state_dir: str | Path, cfg: Model,
                      version: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """A version's global weights as a server's state folder holds them: the newest readable
    checkpoint with the journal after it replayed, as a restart would (so the newest published
    version by default, not only the last checkpointed one), or ``version`` if the aggregator
    still keeps it. Read-only: a running server keeps writing the folder."""
    root = Path(state_dir)
    paths = sorted((root / "checkpoints").glob("ckpt-*.safetensors"), reverse=True)
    if not paths or not (root / "state.db").is_file():
        raise UserError(f"no checkpoint in {root / 'checkpoints'}: is {state_dir} a server's state folder?")
    db = sqlite3.connect(f"file:{root / 'state.db'}?mode=ro", uri=True)
    try:
        db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        for path in paths:
            try:
                tensors, meta = _read(path)
            except (SafetensorError, OSError, ValueError, KeyError) as e:
                log.warning("checkpoint %s cannot be read (%s): using the previous one", path.name, e)
                continue
            agg, _ = _resume(db, cfg, _config_of(json.loads(meta["config"])), tensors, meta, int(meta["seq"]))
            break
        else:
            raise UserError(f"no readable checkpoint in {root / 'checkpoints'}")
    finally:
        db.close()
    chosen = agg.version if version is None else version
    if chosen not in agg.history:
        raise UserError(f"version {chosen} is not kept in {state_dir} (it keeps {sorted(agg.history)})")
    return chosen, agg.history[chosen]


def _config_of(d: dict, cls: type = AggregatorConfig) -> AggregatorConfig:
    """The ``AggregatorConfig`` a checkpoint's ``config`` JSON was written from (nested
    dataclasses and tuples rebuilt from their defaults' types)."""
    defaults = cls()
    kw = {}
    for f in fields(cls):
        default = getattr(defaults, f.name)
        value = d.get(f.name, default)
        if is_dataclass(default) and isinstance(value, dict):
            value = _config_of(value, type(default))
        elif isinstance(default, tuple):
            value = tuple(value)
        kw[f.name] = value
    return cls(**kw)


def _config_json(config: AggregatorConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
