"""HTTP to a stamen server with the retry policy a flaky network and a restarting server need.

Connection errors, timeouts, 5xx and 408/429 are retried with exponential backoff and full
jitter (AWS's "full jitter": sleep uniform(0, min(cap, base·2^attempt))), so a thousand
clients that lost the server at once do not come back in lock-step. A 4xx is the server's
verdict on the request and is raised at once as ``ServerRefused`` with its reason. Uploads are
idempotent by task id, so re-sending after a lost answer is always safe.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from dataclasses import dataclass

import aiohttp
import msgpack

from stamen.core.errors import UserError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class ServerRefused(UserError):
    """The server answered 4xx; ``status`` and the server's reason are kept."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"server refused ({status}): {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 0  # 0: keep trying (a client outlives server restarts)
    seed: int = 0


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

    async def close(self) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      params: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of a 2xx answer; 4xx raises ServerRefused; the rest is retried."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        attempt = 0
        while True:
            try:
                async with self.http.request(method, self.url + path, data=body, params=params,
                                             headers=headers) as r:
                    data = await r.read()
                    if r.status < 400:
                        return r.status, data
                    if r.status not in RETRY_STATUS:
                        raise ServerRefused(r.status, _reason(data))
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                pass
            attempt += 1
            if self.retry.max_attempts and attempt >= self.retry.max_attempts:
                raise UserError(f"server {self.url} unreachable after {attempt} attempts")
            self.retries += 1
            await asyncio.sleep(self.rng.uniform(0, min(self.retry.cap_s, self.retry.base_s * 2 ** attempt)))

    async def call(self, method: str, path: str, obj: dict | None = None, params: dict | None = None) -> dict | None:
        """A msgpack request/answer; None for 204 No Content."""
        status, data = await self.request(method, path, None if obj is None else msgpack.packb(obj), params)
        return None if status == 204 else msgpack.unpackb(data, raw=False)


def _reason(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")
