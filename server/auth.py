"""Join tokens, roles and client tokens, kept in ``<state>/auth.db`` (SQLite).

The operator creates *join tokens* with a role (``stamen token create --role device``) and hands
them out; a client presents one once, at join, and receives its own client id and *client
token*, which it sends as ``Authorization: Bearer`` from then on. An ``admin`` token is itself
a bearer token (it reads full weights and the status; it never joins). Only SHA-256 hashes of
tokens are stored, so a copied state folder does not leak credentials.

A join token is a capability that anyone holding it can spend, so it is bounded three ways: a
use limit (``--uses``), an expiry (``--expires``), and a join rate (``JoinRate``: a token
bucket per join token, so one leaked token cannot mint a thousand Sybils in a second and take
every device slot). ``stamen token revoke`` ends a token and every client that joined with it.
A join is recorded only after the caller has validated it (``join(..., check=...)``), so a
refused join leaves no client behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stamen.core.errors import UserError

ROLES = ("device", "gpu", "admin")
SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (id TEXT PRIMARY KEY, token_hash TEXT UNIQUE NOT NULL, role TEXT NOT NULL,
                                    caps TEXT NOT NULL, joined REAL NOT NULL);
"""
# Columns added after the first release: a state folder from before gains them at open
# (NULL = unlimited, never expires, not revoked, joined by an unknown token).
COLUMNS = {"join_tokens": {"max_uses": "INTEGER", "uses": "INTEGER NOT NULL DEFAULT 0", "expires": "REAL",
                           "revoked": "REAL"},
           "clients": {"join_hash": "TEXT"}}
PREFIX = 12  # characters of a token's hash shown by ``stamen token list`` and accepted by revoke


class Unauthorized(UserError):
    """No token, or one this server never issued (HTTP 401)."""


class Forbidden(UserError):
    """A valid token that may not do this: used up, expired, revoked, wrong role (HTTP 403)."""


class RateLimited(UserError):
    """Joins with one token faster than its rate allows (HTTP 429, which clients retry later)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: a joined client (device/gpu) or the operator (admin, client_id "")."""

    client_id: str
    role: str
    caps: dict


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; see ledger.py
    db.executescript(SCHEMA)
    for table, cols in COLUMNS.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in cols.items():
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    return db


@dataclass(frozen=True)
class JoinToken:
    """One row of ``stamen token list``: the token itself is never stored, only its hash."""

    id: str  # the hash's first PREFIX characters
    role: str
    created: float
    uses: int
    max_uses: int | None
    expires: float | None
    revoked: float | None
    clients: int


class JoinRate:
    """A token bucket per join token: ``per_minute`` joins a minute on average, at most
    ``burst`` at once. The clock is passed in, as the scheduler's is."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate, self.burst = per_minute / 60.0, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # hash → (tokens left, at time)

    def take(self, key: str, now: float) -> None:
        left, at = self._buckets.get(key, (float(self.burst), now))
        left = min(float(self.burst), left + (now - at) * self.rate)
        if left < 1:
            raise RateLimited(f"too many joins with this join token: at most {self.rate * 60:g} a minute "
                              f"(burst {self.burst}); retry in {(1 - left) / self.rate:.0f} s")
        self._buckets[key] = (left - 1, now)


class Auth:
    def __init__(self, state_dir: str | Path, rate: JoinRate | None = None) -> None:
        self.db = _connect(Path(state_dir) / "auth.db")
        self.rate = rate
        self._cache: dict[str, Principal] = {}  # token hash → principal: one lookup per request
        self._data_version = -1
        self._version_read = False  # the data version was read in this step of the event loop

    def create_join_token(self, role: str, max_uses: int | None = None, expires_in_s: float | None = None) -> str:
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        if max_uses is not None and max_uses < 1:
            raise UserError(f"--uses must be at least 1, got {max_uses}")
        if expires_in_s is not None and not expires_in_s > 0:
            raise UserError(f"--expires must be positive, got {expires_in_s}")
        token = f"stj_{role}_{secrets.token_urlsafe(24)}"
        now = time.time()
        self.db.execute("INSERT INTO join_tokens (hash, role, created, max_uses, expires) VALUES (?, ?, ?, ?, ?)",
                        (_hash(token), role, now, max_uses, None if expires_in_s is None else now + expires_in_s))
        return token

    def join(self, join_token: str, caps: dict, now: float, check: Callable[[str], None] = lambda role: None
             ) -> tuple[Principal, str]:
        """A new client for a valid device/gpu join token: its principal and client token.
        ``check(role)`` runs after the token is judged and before anything is written: a join
        it refuses (raises) spends no use and records no client."""
        h = _hash(join_token)
        row = self.db.execute("SELECT role, max_uses, uses, expires, revoked FROM join_tokens WHERE hash = ?",
                              (h,)).fetchone()
        if row is None:
            raise Unauthorized("unknown join token")
        role, max_uses, uses, expires, revoked = row
        if role == "admin":
            raise Unauthorized("an admin token is used as a bearer token; it does not join")
        if revoked is not None:
            raise Forbidden("this join token was revoked")
        if expires is not None and now >= expires:
            raise Forbidden("this join token has expired")
        if max_uses is not None and uses >= max_uses:
            raise Forbidden(f"this join token is used up ({max_uses} joins)")
        if caps.get("role", role) != role:
            raise Unauthorized(f"this join token is for role {role!r}, the client asked for {caps.get('role')!r}")
        check(role)
        if self.rate is not None:
            self.rate.take(h, now)
        client_id, token = f"c{secrets.token_hex(6)}", f"stc_{secrets.token_urlsafe(32)}"
        stored = json.dumps(caps)
        with self.db:  # one transaction: the use is counted exactly when the client exists
            self.db.execute("BEGIN")
            cur = self.db.execute("UPDATE join_tokens SET uses = uses + 1 WHERE hash = ? AND revoked IS NULL "
                                  "AND (max_uses IS NULL OR uses < max_uses)", (h,))
            if cur.rowcount != 1:
                raise Forbidden("this join token was used up or revoked meanwhile")
            self.db.execute("INSERT INTO clients (id, token_hash, role, caps, joined, join_hash) VALUES (?, ?, ?, ?, ?, ?)",
                            (client_id, _hash(token), role, stored, now, h))
        # The new client's first request finds it here, as ``principal`` would have read it back.
        self._cache[_hash(token)] = Principal(client_id, role, json.loads(stored))
        return Principal(client_id, role, caps), token

    def tokens(self) -> list[JoinToken]:
        rows = self.db.execute(
            "SELECT t.hash, t.role, t.created, t.uses, t.max_uses, t.expires, t.revoked, "
            "(SELECT COUNT(*) FROM clients c WHERE c.join_hash = t.hash) FROM join_tokens t ORDER BY t.created").fetchall()
        return [JoinToken(r[0][:PREFIX], *r[1:]) for r in rows]

    def revoke(self, prefix: str, now: float) -> tuple[JoinToken, list[str]]:
        """Revoke the join token whose hash starts with ``prefix`` (as ``stamen token list``
        shows it) and every client that joined with it; returns the token and those client ids."""
        if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
            raise UserError(f"token id {prefix!r}: give at least 6 hex characters as `stamen token list` shows them")
        rows = self.db.execute("SELECT hash FROM join_tokens WHERE hash LIKE ?", (prefix + "%",)).fetchall()
        if len(rows) != 1:
            raise UserError(f"token id {prefix!r} matches {len(rows)} tokens: give a longer prefix" if rows
                            else f"no join token with id {prefix!r}")
        h = rows[0][0]
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE join_tokens SET revoked = ? WHERE hash = ? AND revoked IS NULL", (now, h))
            ids = [r[0] for r in self.db.execute("SELECT id FROM clients WHERE join_hash = ?", (h,))]
            self.db.execute("DELETE FROM clients WHERE join_hash = ?", (h,))
        self._cache.clear()
        return next(t for t in self.tokens() if h.startswith(t.id)), ids

    def forget(self, client_id: str) -> None:
        """Remove one client record (one that no tier fits any more after a config change)."""
        self.db.execute("DELETE FROM clients WHERE id = ?", (client_id,))
        self._cache.clear()

    def principal(self, bearer: str | None) -> Principal:
        if not bearer:
            raise Unauthorized("missing Authorization: Bearer token")
        self._read_version()
        h = _hash(bearer)
        if h in self._cache:
            return self._cache[h]
        row = self.db.execute("SELECT id, role, caps FROM clients WHERE token_hash = ?", (h,)).fetchone()
        if row is not None:
            p = Principal(row[0], row[1], json.loads(row[2]))
        elif self.db.execute("SELECT 1 FROM join_tokens WHERE hash = ? AND role = 'admin' AND revoked IS NULL",
                             (h,)).fetchone():
            p = Principal("", "admin", {})
        else:
            raise Unauthorized("unknown token")
        self._cache[h] = p
        return p

    def _read_version(self) -> None:
        """Forget the cached principals if another process (``stamen token revoke``) wrote to
        the database since it was last read. On an event loop, read once per step of the loop
        (a query per request had cost ~7 µs of its ~9), by the step's first request: every
        request served in a step was read from its socket before that, so one sent after a
        revocation still sees it."""
        if self._version_read:
            return
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._cache.clear()
            self._data_version = version
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (the CLI, a test): read every time
            return
        self._version_read = True
        loop.call_soon(self._unread)

    def _unread(self) -> None:
        self._version_read = False

    def clients(self) -> list[Principal]:
        rows = self.db.execute("SELECT id, role, caps FROM clients ORDER BY joined").fetchall()
        return [Principal(i, r, json.loads(c)) for i, r, c in rows]

    def close(self) -> None:
        self.db.close()


def create_token(state_dir: str | Path, role: str, init: bool = False, max_uses: int | None = None,
                 expires_in_s: float | None = None) -> str:
    """``stamen token create --role R --state DIR``: works whether or not the server runs
    (SQLite WAL lets both write the same database). ``DIR`` must already hold a federation (a
    server ran there, or a token was made there) unless ``init`` starts one: a mistyped
    folder would otherwise get tokens the server never reads."""
    state = Path(state_dir)
    if not init and not (state / "auth.db").is_file():
        raise UserError(f"{state} holds no federation: pass the server's --state folder, "
                        "or add --init to start a new federation there")
    state.mkdir(parents=True, exist_ok=True)
    auth = Auth(state_dir)
    try:
        return auth.create_join_token(role, max_uses, expires_in_s)
    finally:
        auth.close()


def list_tokens(state_dir: str | Path) -> list[JoinToken]:
    """``stamen token list``."""
    if not (Path(state_dir) / "auth.db").is_file():
        raise UserError(f"no server state in {state_dir} (auth.db not found)")
    auth = Auth(state_dir)
    try:
        return auth.tokens()
    finally:
        auth.close()


def revoke_token(state_dir: str | Path, prefix: str) -> tuple[JoinToken, list[str]]:
    """``stamen token revoke ID``: a running server refuses the token and its clients from
    their next request (it sees the database change through SQLite's ``data_version``)."""
    if not (Path(state_dir) / "auth.db").is_file():
        raise UserError(f"no server state in {state_dir} (auth.db not found)")
    auth = Auth(state_dir)
    try:
        return auth.revoke(prefix, time.time())
    finally:
        auth.close()
