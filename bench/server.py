"""How many device updates per second one stamen server takes over HTTP, against the I/O floor.

Starts a real server process on loopback (gpt-tiny), then N concurrent device clients in this
process, each doing join once and then cycles of uploads with a real phone-low update of its own (a
random delta of the plan's trainable slices, encoded with the tier's codec). A client asks for its first task
(``GET /v1/task``) and then takes each next one from its upload's answer (``?next=1``), as the
edge client does, so a steady client makes one request per update; it asks again only when an
answer carried no task. In the same run the same clients drive the floor: a bare aiohttp process
(same event loop) whose update route reads the same bodies, appends them to a file, one fsync
per batch (the bodies that arrived during one fsync are made durable by the next), and answers
with a next task (its task route answers at once). No durable server can take updates faster
than that, so ``ratio`` = stamen / floor says how much of the I/O the server leaves on the
table. Prints one JSON line per N:
``{"clients", "updates_per_s", "floor_updates_per_s", "ratio", "p50_ms", "p99_ms", "floor_p99_ms",
"errors", "server_cpu_ms"}`` — latencies are stamen's, per request (task or update), and
``floor_p99_ms`` the floor's p99 under the same clients: what the instrument itself gives (its
one event loop opens N connections at the start, ~0.75 ms of its CPU each, and spends ~0.6 ms
per update), so a p99 is read against it; errors count every
non-2xx answer or failed connection to stamen; ``server_cpu_ms`` is the stamen process's CPU
time (user + system, all its threads) per accepted update, which the machine's other load
moves far less than the rates (null where ``/proc`` is missing).

    python bench/server.py            # N = 100 and N = 1000
    python bench/server.py --clients 50 --cycles 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import torch
from aiohttp import web

from stamen.compression.codecs import encode
from stamen.core.model import PRESETS
from stamen.core.plan import Plan
from stamen.server.auth import create_token
from stamen.server.config import load_config

CFG = PRESETS["gpt-tiny"]
FED = """
[aggregation]
buffer_k = 50
tau_max = 64
[scheduler]
max_in_flight = 100000
[server]
joins_per_minute = 1e9  # the bench joins every client at once; the default rate limit is for the open internet
join_burst = 100000
"""
SERVER = "import sys; from stamen.server.app import run_server; run_server('gpt-tiny', sys.argv[1], sys.argv[2], '127.0.0.1', 0)"


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    """A server process and its URL, read from its "serving on" line."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError(f"server did not start: {' '.join(args)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.communicate(timeout=60)


def floor_app(path: Path) -> web.Application:
    """The floor: read the body, append it to one file, answer once an fsync covers it. Bodies
    that arrive while an fsync runs wait for the next one (group commit), as stamen's do."""
    pending: list[tuple[bytes, asyncio.Future]] = []
    out = open(path, "ab")
    writer: list[asyncio.Task] = []

    def write(bodies: list[bytes]) -> None:
        for b in bodies:
            out.write(b)
        out.flush()
        os.fsync(out.fileno())

    async def commit() -> None:
        while pending:
            batch = pending[:]
            del pending[:]
            await asyncio.to_thread(write, [b for b, _ in batch])
            for _, done in batch:
                done.set_result(None)

    async def task(request: web.Request) -> web.Response:
        return web.Response(body=msgpack.packb({"task": {"task_id": "t0"}}), content_type="application/msgpack")

    async def update(request: web.Request) -> web.Response:
        done = asyncio.get_running_loop().create_future()
        pending.append((await request.read(), done))
        if not writer or writer[0].done():
            writer[:] = [asyncio.create_task(commit())]
        await done
        answer = {"status": "accepted", "task": {"task_id": "t0"}} if request.query.get("next") == "1" else {"status": "accepted"}
        return web.Response(body=msgpack.packb(answer), status=202, content_type="application/msgpack")

    app = web.Application(client_max_size=64 << 20)
    app.add_routes([web.get("/v1/task", task), web.post("/v1/updates/{task}", update)])
    return app


def serve_floor(path: Path) -> None:
    async def main() -> None:
        runner = web.AppRunner(floor_app(path))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"floor: serving on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.updates = 0


async def timed(stats: Stats, http: aiohttp.ClientSession, method: str, url: str, **kw) -> tuple[int, bytes]:
    t0 = time.perf_counter()
    try:
        async with http.request(method, url, **kw) as r:
            body = await r.read()
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        stats.errors += 1
        return 0, b""
    stats.latencies.append(time.perf_counter() - t0)
    if status >= 400:
        stats.errors += 1
    return status, body


async def join(http: aiohttp.ClientSession, url: str, join_token: str) -> dict:
    caps = {"role": "device", "memory_bytes": 4 << 20, "flops": 1e9, "runtimes": ["torch"]}
    async with http.post(url + "/v1/join", data=msgpack.packb({"join_token": join_token, "capabilities": caps})) as r:
        if r.status != 200:
            raise RuntimeError(f"join refused: {r.status} {await r.text()}")
        return msgpack.unpackb(await r.read())


def payloads_for(me: dict, config: Path, n: int) -> list[bytes]:
    """``n`` real updates for the client's plan, one per client, each its own random delta
    encoded with the tier's codec (made outside the timed phase: the bench measures the server,
    not the client's encoder). Distinct deltas matter: a top-k codec keeps different coordinates
    for each, as real devices' updates do, so the server's filter and apply see a realistic
    spread of columns (with one payload for every client, 1,236 of the filter matrix's 12,912
    columns held a non-zero)."""
    plan = Plan.from_dict(me["plan"])
    shapes = plan.shapes(CFG)
    fed = load_config(config)
    tier = fed.tiers[me["tier"]]
    payloads = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        delta = {name: torch.randn(shapes[name], generator=g) * 1e-3 for name in plan.trainable(CFG)}
        payloads.append(encode(delta, tier.codec, meta={"tokens": tier.batch_size * fed.training.seq_len}))
    return payloads


async def device(http: aiohttp.ClientSession, url: str, token: str, cycles: int, payload: bytes,
                 stats: Stats) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    task_id = None
    for cycle in range(cycles):
        if task_id is None:
            status, body = await timed(stats, http, "GET", url + "/v1/task", params={"wait": "5"}, headers=auth)
            if status != 200:
                continue
            task_id = msgpack.unpackb(body)["task"]["task_id"]
        more = {"next": "1"} if cycle + 1 < cycles else {}  # the last upload asks for no task it would leave open
        status, body = await timed(stats, http, "POST", f"{url}/v1/updates/{task_id}", params=more, data=payload,
                                   headers=auth)
        stats.updates += status == 202
        task_id = msgpack.unpackb(body).get("task", {}).get("task_id") if status == 202 else None


async def drive(url: str, tokens: list[str], cycles: int, payloads: list[bytes]) -> tuple[float, Stats]:
    """N clients through ``cycles`` uploads each: (updates per second, stats)."""
    stats = Stats()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(device(http, url, token, cycles, payload, stats)
                               for token, payload in zip(tokens, payloads)))
        wall = time.perf_counter() - t0
    return stats.updates / wall, stats


async def run(url: str, floor: str, join_token: str, n: int, cycles: int, config: Path, pid: int) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        joined = await asyncio.gather(*(join(http, url, join_token) for _ in range(n)))
    payloads = payloads_for(joined[0], config, n)  # every client declares the same memory: one plan
    cpu0 = cpu_seconds(pid)
    rate, stats = await drive(url, [me["token"] for me in joined], cycles, payloads)
    cpu1 = cpu_seconds(pid)
    floor_rate, floor_stats = await drive(floor, ["floor"] * n, cycles, payloads)
    lat, floor_lat = np.array(stats.latencies) * 1000, np.array(floor_stats.latencies) * 1000
    return {"clients": n, "updates_per_s": round(rate, 1), "floor_updates_per_s": round(floor_rate, 1),
            "ratio": round(rate / floor_rate, 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "floor_p99_ms": round(float(np.percentile(floor_lat, 99)), 1) if len(floor_lat) else None,
            "errors": stats.errors,
            "server_cpu_ms": round(1000 * (cpu1 - cpu0) / stats.updates, 2) if cpu0 is not None and stats.updates else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--serve-floor", type=Path, help=argparse.SUPPRESS)  # the floor's own process
    args = ap.parse_args()
    if args.serve_floor:
        return serve_floor(args.serve_floor)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "fed.toml").write_text(FED)
        procs = []
        try:
            proc, url = start(["-c", SERVER, str(root / "state"), str(root / "fed.toml")])
            procs.append(proc)
            server = proc.pid
            proc, floor = start([__file__, "--serve-floor", str(root / "floor.bin")])
            procs.append(proc)
            token = create_token(root / "state", "device")
            for n in args.clients:
                print(json.dumps(asyncio.run(run(url, floor, token, n, args.cycles, root / "fed.toml", server))), flush=True)
        finally:
            for proc in procs:
                stop(proc)


if __name__ == "__main__":
    main()
