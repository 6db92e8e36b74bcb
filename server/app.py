"""The HTTP face of a federation (aiohttp): routes translate requests into ``Federation``
calls and its refusals into 4xx answers with a reason.

Bodies are msgpack (tensor payloads are ``stamen.core.wire`` frames); errors are JSON
``{"error": reason}`` so they read well from curl too. Every request runs under a timeout,
bodies are capped at ``[server] max_body_mib``, and SIGTERM/SIGINT stop accepting, let
in-flight requests finish, and checkpoint before exit; restarting on the same state folder
resumes from there.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import os
import re
import signal
import socket
import sqlite3
import ssl
import time
from collections import Counter
from pathlib import Path

import msgpack
import torch
from aiohttp import web
from threadpoolctl import threadpool_limits

from stamen.core.errors import UserError
from stamen.core.wire import packb
from stamen.server.bundles import BundlePublisher
from stamen.server.config import FederationConfig, load_config
from stamen.server.metrics import render
from stamen.server.coordinator import RequestError
from stamen.server.service import Federation, http_status

FEDERATION = web.AppKey("federation", Federation)
REQUESTS = web.AppKey("requests", Counter)
BUNDLES = web.AppKey("bundles", BundlePublisher)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
POLL_STEP_S = 0.1  # how often a long poll looks for a free task slot
MAINTENANCE_S = 1.0  # how often deadlines and the max-wait flush are checked
SWEEP_S = 1.0  # how often requests past the request timeout are looked for
# glibc's mallopt parameters, and the largest block served from the heap (glibc's own ceiling
# on 64-bit); see ``_keep_freed_memory``
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MMAP_MAX = -1, -3, 32 << 20
GC_GEN0 = 100_000  # net new tracked objects between the collector's young-generation passes (Python's default: 700)


def _msgpack(obj, status: int = 200) -> web.Response:
    return web.Response(body=packb(obj), status=status, content_type="application/msgpack")


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else None


def _int_query(request: web.Request, key: str, default: int | None = None) -> int | None:
    raw = request.query.get(key)
    if raw is None:
        return default
    return _int(f"query parameter {key}", raw)


def _int(what: str, raw: str) -> int:
    """A non-negative integer that fits 64 bits (version numbers, seconds): a 401-digit
    ``wait`` is refused here rather than overflowing float arithmetic later."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise RequestError(f"{what} {raw[:40]!r} is not a non-negative integer below 10^18")
    return int(raw)


class Deadlines:
    """The requests' timeouts, swept together rather than a timer per request.

    ``asyncio.timeout`` made and cancelled an event-loop timer for every request: ~5% of the
    loop's time at 1,000 clients (uvloop's timer handles are closed on the next turn of the
    loop). Every request has the same timeout, so they come due in the order they started:
    requests in flight are kept in that order, and one sweep a second (``SWEEP_S``, or a
    quarter of the timeout if shorter) cancels those past their deadline, which then answer
    408, at most a sweep late (an upload waiting on its journal commit once its row is applied:
    the committer's futures refuse cancellation). As with ``asyncio.timeout``, a cancellation
    from elsewhere (shutdown) still propagates."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.every_s = min(SWEEP_S, timeout_s / 4)
        self._due: dict[asyncio.Task, tuple[float, int]] = {}  # in start order: (deadline, its cancellations then)
        self._expired: dict[asyncio.Task, int] = {}  # cancelled by the sweep: its cancellations before

    def start(self, task: asyncio.Task, now: float) -> None:
        self._due[task] = (now + self.timeout_s, task.cancelling())

    def finish(self, task: asyncio.Task) -> bool:
        """Whether the sweep cancelled ``task`` (and no one else did): that cancellation is
        taken back, and the request answers 408."""
        if self._due.pop(task, None) is not None:
            return False
        before = self._expired.pop(task, None)
        return before is not None and task.uncancel() <= before

    def sweep(self, now: float) -> None:
        """Cancel the requests past their deadline."""
        for task, (_, before) in list(itertools.takewhile(lambda item: item[1][0] <= now, self._due.items())):
            del self._due[task]
            self._expired[task] = before
            task.cancel()


DEADLINES = web.AppKey("deadlines", Deadlines)


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """Timeout, body-size and refusal handling for every route; counts requests for /metrics."""
    deadlines = request.app[DEADLINES]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    task = asyncio.current_task()
    deadlines.start(task, asyncio.get_running_loop().time())
    try:
        try:
            response = await handler(request)
        finally:
            expired = deadlines.finish(task)
    except asyncio.CancelledError:
        if not expired:
            raise
        response = _error(408, "request took longer than the server's request timeout")
    except TimeoutError:  # a wait of the handler's own (a bundle's export) ran out
        response = _error(408, "request took longer than the server's request timeout")
    except web.HTTPRequestEntityTooLarge:
        response = _error(413, f"body larger than the server's limit of {request.client_max_size} bytes")
    except web.HTTPException as e:
        response = _error(e.status, e.reason)
    except UserError as e:
        response = _error(http_status(e), str(e))
    request.app[REQUESTS][(route, response.status)] += 1
    return response


def _unpack(data: bytes) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, max_str_len=1 << 16, max_bin_len=1 << 16,
                              max_array_len=1 << 10, max_map_len=1 << 10)
    except Exception as e:  # msgpack raises assorted types on garbage
        raise RequestError(f"body is not msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("body must be a msgpack map")
    return obj


async def join(request: web.Request) -> web.Response:
    body = _unpack(await request.read())
    token, caps = body.get("join_token"), body.get("capabilities")
    if not isinstance(token, str) or not isinstance(caps, dict):
        raise RequestError("join needs join_token (string) and capabilities (map)")
    return _msgpack(request.app[FEDERATION].join(token, caps, time.time()))


async def task(request: web.Request) -> web.Response:
    fed: Federation = request.app[FEDERATION]
    p = fed.principal(_bearer(request), time.time())
    wait = min(_int_query(request, "wait", 0), fed.fed.server.long_poll_s)
    deadline = time.monotonic() + wait
    while True:
        t = await fed.task(p, time.time())
        if t is not None:
            return _msgpack({"task": t.to_dict(), "version": fed.coord.version})
        if time.monotonic() >= deadline:
            return web.Response(status=204)
        await asyncio.sleep(POLL_STEP_S)


async def weights(request: web.Request) -> web.Response:
    fed: Federation = request.app[FEDERATION]
    p = fed.principal(_bearer(request), time.time())
    version = _int("version", request.match_info["version"])
    plan = request.query.get("plan", "")
    body = fed.weights(p, version, plan, _int_query(request, "have"))
    return web.Response(body=body, content_type="application/octet-stream")


async def update(request: web.Request) -> web.Response:
    """With ``?next=1`` the answer also carries the client's next task when one is free now
    (what ``GET /v1/task?wait=0`` would answer), so a steady client makes one request per
    cycle instead of two; without a free task the answer has none and the client long-polls."""
    fed: Federation = request.app[FEDERATION]
    p = fed.principal(_bearer(request), time.time())
    then = _int_query(request, "next", 0)
    if then > 1:
        raise RequestError(f"query parameter next must be 0 or 1, got {then}")
    result = await fed.submit(p, request.match_info["task"], await request.read(), time.time(), next_task=bool(then))
    return _msgpack(result, status=202)


async def release(request: web.Request) -> web.Response:
    fed: Federation = request.app[FEDERATION]
    p = fed.principal(_bearer(request), time.time())
    return _msgpack(fed.release(p, request.match_info["task"]))


async def bundle(request: web.Request) -> web.StreamResponse:
    """A plan's artifact bundle for a runtime, published under ``<state>/bundles/<plan>/<runtime>/``
    on first need (``BundlePublisher``): without a file name, the listing (name → bytes); with
    one, the file. While the export runs the request waits up to the long-poll limit, then 503."""
    fed: Federation = request.app[FEDERATION]
    p = fed.principal(_bearer(request), time.time())
    parts = [request.match_info["plan"], request.match_info["runtime"], request.match_info.get("file", "")]
    if not all(SAFE_NAME.match(x) for x in parts[:2]) or (parts[2] and not SAFE_NAME.match(parts[2])):
        raise RequestError("bad bundle path")
    plan = fed.plan_for(p, parts[0])
    folder = await request.app[BUNDLES].get(plan.hash, parts[1], fed.fed.server.long_poll_s)
    if not parts[2]:
        return _msgpack({"files": {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}})
    path = folder / parts[2]
    if not path.is_file():
        raise RequestError(f"bundle has no file {parts[2]!r}", 404)
    return web.FileResponse(path)


def _status_for(request: web.Request) -> dict:
    """The full status for an admin token; without one, the aggregate figures if the
    federation file sets ``[server] public_status``, else 401/403 (it lists every client)."""
    fed: Federation = request.app[FEDERATION]
    bearer = _bearer(request)
    if bearer is None and fed.fed.server.public_status:
        return fed.status(public=True)
    if fed.principal(bearer, time.time()).role != "admin":
        raise RequestError("the status is for an admin token (or set [server] public_status)", 403)
    return fed.status()


async def status(request: web.Request) -> web.Response:
    return web.json_response(_status_for(request))


async def metrics(request: web.Request) -> web.Response:
    text = render(_status_for(request), request.app[REQUESTS])
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def _maintenance(app: web.Application) -> None:
    while True:
        await asyncio.sleep(MAINTENANCE_S)
        await app[FEDERATION].poll(time.time())


async def _sweep(deadlines: Deadlines) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(deadlines.every_s)
        deadlines.sweep(loop.time())


def make_app(federation: Federation, state_dir: Path) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=federation.fed.server.max_body_mib << 20)
    app[FEDERATION], app[REQUESTS] = federation, Counter()
    app[DEADLINES] = Deadlines(federation.fed.server.request_timeout_s)
    tiers = {f"{name}/{plan.name}": (plan, federation.fed.tiers[name].batch_size)
             for name, plans in federation.coord.tier_plans.items() for plan in plans}
    app[BUNDLES] = BundlePublisher(federation.spec, tiers, federation.fed.training.seq_len, state_dir / "bundles",
                                   federation.lora.describe() if federation.lora else None)
    app.add_routes([
        web.post("/v1/join", join),
        web.get("/v1/task", task),
        web.get("/v1/weights/{version}", weights),
        web.post("/v1/updates/{task}", update),
        web.delete("/v1/tasks/{task}", release),
        web.get("/v1/bundles/{plan}/{runtime}", bundle),
        web.get("/v1/bundles/{plan}/{runtime}/{file}", bundle),
        web.get("/v1/status", status),
        web.get("/metrics", metrics),
    ])

    async def background(app: web.Application):
        jobs = [asyncio.create_task(_maintenance(app)), asyncio.create_task(_sweep(app[DEADLINES]))]
        yield
        for job in jobs:
            job.cancel()
        app[BUNDLES].close()

    app.cleanup_ctx.append(background)
    return app


def _tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if not (cert and key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    for p in (cert, key):
        if not Path(p).is_file():
            raise UserError(f"TLS file not found: {p}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise UserError(f"cannot load TLS certificate/key: {e}") from None
    return ctx


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything else starts: a port in use (or out
    of reach) is one line, with no state touched and nothing printed as serving."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {os.strerror(e.errno).lower() if e.errno else e}") from None
    return sock


async def serve(federation: Federation, state_dir: Path, sock: socket.socket,
                tls: ssl.SSLContext | None, stop: asyncio.Event) -> None:
    """Serve on the bound ``sock`` until ``stop`` is set, then drain in-flight requests and checkpoint."""
    runner = web.AppRunner(make_app(federation, state_dir), shutdown_timeout=federation.fed.server.long_poll_s + 5,
                           handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=tls).start()
    host, bound = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    print(f"stamen server: model {federation.spec.name}, version {federation.coord.version}, "
          f"serving on {scheme}://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await federation.drain()
        federation.close()
        print(f"stamen server: stopped at version {federation.coord.version}, checkpoint written", flush=True)


def run_server(model: str, state_dir: str | Path, config_path: str | Path | None = None,
               host: str = "127.0.0.1", port: int = 8080, tls_cert: str | None = None,
               tls_key: str | None = None, eval_data: str = "stdlib") -> None:
    """``stamen server``: blocks until SIGTERM/SIGINT."""
    fed_cfg: FederationConfig = load_config(config_path)
    tls = _tls(tls_cert, tls_key)
    state = Path(state_dir)
    sock = listen(host, port)
    try:
        federation = Federation(model, state, fed_cfg, eval_data=eval_data)
    except (OSError, sqlite3.Error) as e:  # e.g. a read-only or missing folder: the operator's to fix
        sock.close()
        raise UserError(f"cannot start on state folder {state}: {e}") from None
    except BaseException:
        sock.close()
        raise

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(federation, state, sock, tls, stop)

    _settle_process()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def _settle_process() -> None:
    """Process-wide settings for a long-running server, once its start-up objects exist.

    The cyclic garbage collector: the model, torch's and aiohttp's modules and the federation's
    tables are ~300,000 objects that live as long as the process, and every full collection walked
    them all (~0.1 s each, ~1.2 s of CPU in a 3,000-update bench run). ``gc.freeze`` moves them
    out of its reach. A young pass walks every tracked object made since the last one that is
    still alive, and a busy server's live young objects are its requests in flight (1,000 clients:
    their requests, futures, decoded updates and tensors), so each pass cost 4-40 ms and freed
    next to nothing (15 objects in a whole bench run): with a threshold of 20,000 the
    population's swings alone set one off every ~300 updates, ~64 µs of the event loop's CPU per
    update. At 100,000 none ran between 10,000 updates; reference counting frees the requests'
    objects anyway, and only cycles wait for the collector. numpy's BLAS: one thread. Its calls
    here are dots and small matrix-vector products that take microseconds, and a second BLAS
    thread spun after each one, waiting for more work (~12% of the server's CPU under
    bench/server.py). torch: every core but the event loop's. Its threads spin-wait between parallel regions, so with the loop busy on
    the same cores one held-out scoring of gpt-tiny took 0.26-1.4 s of CPU on two threads
    against 0.04 s on one. The C allocator keeps freed memory (``_keep_freed_memory``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 20, 20)
    _keep_freed_memory()
    threadpool_limits(1, user_api="blas")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores - 1))


def _keep_freed_memory() -> None:
    """glibc's malloc: blocks up to ``MMAP_MAX`` come from the heap, and freed memory is kept
    for reuse rather than handed back to the kernel. By default a block above a threshold that
    moves with what was last freed is mapped afresh and unmapped when freed, so the flush's
    matrices (the robust filter's K × M copies, a few MB each, every K updates) came back as new
    pages every time: ~40 page faults per update at 1,000 clients, a third of the filter's time.
    The server's peak memory is then what it keeps. Elsewhere (no glibc) nothing changes."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_MAX)
    mallopt(M_TRIM_THRESHOLD, 4 * MMAP_MAX)


def _loop_factory():
    """uvloop's event loop (libuv) where it is installed, asyncio's own elsewhere (Windows):
    the same aiohttp server answers small requests with less CPU per request on it."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
