"""Join tokens, roles and client tokens, kept in ``<state>/auth.db`` (SQLite).

The operator creates *join tokens* with a role (``stamen token create --role device``) and hands
them out; a client presents one once, at join, and receives its own client id and *client
token*, which it sends as ``Authorization: Bearer`` from then on. An ``admin`` token is itself
a bearer token (it reads full weights; it never joins). Only SHA-256 hashes of tokens are
stored, so a copied state folder does not leak credentials.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from stamen.core.errors import UserError

ROLES = ("device", "gpu", "admin")
SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (hash TEXT PRIMARY KEY, role TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (id TEXT PRIMARY KEY, token_hash TEXT UNIQUE NOT NULL, role TEXT NOT NULL,
                                    caps TEXT NOT NULL, joined REAL NOT NULL);
"""


class Unauthorized(UserError):
    """No token, or one this server never issued (HTTP 401)."""


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
    return db


class Auth:
    def __init__(self, state_dir: str | Path) -> None:
        self.db = _connect(Path(state_dir) / "auth.db")
        self._cache: dict[str, Principal] = {}  # token hash → principal: one lookup per request

    def create_join_token(self, role: str) -> str:
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        token = f"stj_{role}_{secrets.token_urlsafe(24)}"
        self.db.execute("INSERT INTO join_tokens VALUES (?, ?, ?)", (_hash(token), role, time.time()))
        return token

    def join(self, join_token: str, caps: dict) -> tuple[Principal, str]:
        """A new client for a valid device/gpu join token: its principal and client token."""
        row = self.db.execute("SELECT role FROM join_tokens WHERE hash = ?", (_hash(join_token),)).fetchone()
        if row is None:
            raise Unauthorized("unknown join token")
        role = row[0]
        if role == "admin":
            raise Unauthorized("an admin token is used as a bearer token; it does not join")
        if caps.get("role", role) != role:
            raise Unauthorized(f"this join token is for role {role!r}, the client asked for {caps.get('role')!r}")
        client_id, token = f"c{secrets.token_hex(6)}", f"stc_{secrets.token_urlsafe(32)}"
        self.db.execute("INSERT INTO clients VALUES (?, ?, ?, ?, ?)",
                        (client_id, _hash(token), role, json.dumps(caps), time.time()))
        return Principal(client_id, role, caps), token

    def principal(self, bearer: str | None) -> Principal:
        if not bearer:
            raise Unauthorized("missing Authorization: Bearer token")
        h = _hash(bearer)
        if h in self._cache:
            return self._cache[h]
        row = self.db.execute("SELECT id, role, caps FROM clients WHERE token_hash = ?", (h,)).fetchone()
        if row is not None:
            p = Principal(row[0], row[1], json.loads(row[2]))
        elif self.db.execute("SELECT 1 FROM join_tokens WHERE hash = ? AND role = 'admin'", (h,)).fetchone():
            p = Principal("", "admin", {})
        else:
            raise Unauthorized("unknown token")
        self._cache[h] = p
        return p

    def clients(self) -> list[Principal]:
        rows = self.db.execute("SELECT id, role, caps FROM clients ORDER BY joined").fetchall()
        return [Principal(i, r, json.loads(c)) for i, r, c in rows]

    def close(self) -> None:
        self.db.close()


def create_token(state_dir: str | Path, role: str, init: bool = False) -> str:
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
        return auth.create_join_token(role)
    finally:
        auth.close()
