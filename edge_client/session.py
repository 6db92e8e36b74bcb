"""HTTP to a stamen server with the retry policy a flaky network and a restarting server need.

Connection errors, timeouts, 502/503/504 (a restarting server or its proxy) and 408/429 are
retried with exponential backoff and full jitter (AWS's "full jitter": sleep uniform(0,
min(cap, base·2^attempt))), so a thousand clients that lost the server at once do not come
back in lock-step. Any other 5xx is a server fault that re-sending the same request is unlikely
to cure: it is retried ``max_server_errors`` times, then raised with the server's reason. A 4xx
is the server's verdict on the request and is raised at once as ``ServerRefused`` with its
reason. Uploads are idempotent by task id, so re-sending after a lost answer is always safe.

Until the server has answered once, a connection failure is the user's to fix (a wrong host or
port, a server not started): it is raised at once as one line, not retried. After that an
outage is a restart or a network drop: each retry is logged with its delay, and the session
gives up after ``max_outage_s`` without an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
from dataclasses import dataclass

import aiohttp
import msgpack

from stamen.core.errors import UserError

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 429, 502, 503, 504}  # retried for as long as the policy allows


class ServerRefused(UserError):
    """The server answered 4xx; ``status`` and the server's reason are kept."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"server refused ({status}): {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 0  # 0: no count limit (a client outlives server restarts)...
    max_outage_s: float = 600.0  # ...but not an outage longer than this
    max_server_errors: int = 5  # other 5xx answers to one request before giving up
    seed: int = 0


def _why(e: BaseException) -> str:
    """A connection failure as a person says it: "connection refused", not aiohttp's repr."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return f"certificate verify failed ({e.certificate_error})"
    os_error = getattr(e, "os_error", None) or (e if isinstance(e, OSError) else None)
    if isinstance(os_error, ssl.SSLError):
        return str(os_error)
    if os_error is not None and os_error.errno:
        return os.strerror(os_error.errno).lower()
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


class Session:
    def __init__(self, url: str, token: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 timeout_s: float = 120.0, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.retry = retry
        self.rng = random.Random(retry.seed)
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                          connector=aiohttp.TCPConnector(ssl=ctx) if ctx else None)
        self.retries = 0  # how many times a request was re-sent, for progress display and tests
        self.reached = False  # has the server answered at least once?

    async def close(self) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      params: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of a 2xx answer; 4xx raises ServerRefused; the rest is retried."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        attempt, faults, since = 0, 0, time.monotonic()
        while True:
            try:
                async with self.http.request(method, self.url + path, data=body, params=params,
                                             headers=headers) as r:
                    data = await r.read()
                    self.reached = True
                    if r.status < 400:
                        if attempt:
                            log.info(f"{self.url} answers again after {time.monotonic() - since:.0f} s")
                        return r.status, data
                    if r.status >= 500 and r.status not in RETRY_STATUS:
                        faults += 1
                        if faults > self.retry.max_server_errors:
                            raise UserError(f"server {self.url} failed {faults} times on {method} {path} "
                                            f"({r.status}): {_reason(data)}")
                    elif r.status not in RETRY_STATUS:
                        raise ServerRefused(r.status, _reason(data))
                    why = f"HTTP {r.status}: {_reason(data)}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                if not self.reached:
                    raise UserError(f"cannot reach {self.url}: {_why(e)}") from None
                why = _why(e)
            attempt += 1
            down = time.monotonic() - since
            if (self.retry.max_attempts and attempt >= self.retry.max_attempts) or down >= self.retry.max_outage_s:
                raise UserError(f"server {self.url} unreachable for {down:.0f} s ({attempt} attempts, last: {why}); "
                                "giving up")
            self.retries += 1
            delay = self.rng.uniform(0, min(self.retry.cap_s, self.retry.base_s * 2 ** attempt))
            log.warning(f"{method} {path}: {why}; retry {attempt} in {delay:.1f} s "
                        f"(gives up after {self.retry.max_outage_s:.0f} s without an answer)")
            await asyncio.sleep(delay)

    async def call(self, method: str, path: str, obj: dict | None = None, params: dict | None = None) -> dict | None:
        """A msgpack request/answer; None for 204 No Content."""
        status, data = await self.request(method, path, None if obj is None else msgpack.packb(obj), params)
        return None if status == 204 else msgpack.unpackb(data, raw=False)


def _reason(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")
