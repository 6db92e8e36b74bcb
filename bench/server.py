"""How many device updates per second one stamen server takes over HTTP.

Starts a real server process on loopback (gpt-tiny), then N concurrent device clients in this
process, each doing join once and then task → update cycles with real phone-low updates (the
plan's trainable slices, encoded with the tier's codec). Prints one JSON line per N:
``{"clients", "updates_per_s", "p50_ms", "p99_ms", "errors"}`` — latencies are per request
(task or update), errors count every non-2xx answer or failed connection.

    python bench/server.py            # N = 100 and N = 1000
    python bench/server.py --clients 50 --cycles 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
"""
SERVER = "import sys; from stamen.server.app import run_server; run_server('gpt-tiny', sys.argv[1], sys.argv[2], '127.0.0.1', 0)"


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    (root / "fed.toml").write_text(FED)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root / "state"), str(root / "fed.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("server did not start")


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
        return msgpack.unpackb(await r.read())


def payload_for(me: dict, config: Path) -> bytes:
    """A real update for the client's plan, encoded with its tier's codec (made once, outside
    the timed phase: the bench measures the server, not the client's encoder)."""
    plan = Plan.from_dict(me["plan"])
    shapes = plan.shapes(CFG)
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(shapes[n], generator=g) * 1e-3 for n in plan.trainable(CFG)}
    tier = load_config(config).tiers[me["tier"]]
    return encode(delta, tier.codec, meta={"tokens": tier.batch_size * load_config(config).training.seq_len})


async def device(http: aiohttp.ClientSession, url: str, token: str, cycles: int, payload: bytes,
                 stats: Stats) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(cycles):
        status, body = await timed(stats, http, "GET", url + "/v1/task", params={"wait": "5"}, headers=auth)
        if status != 200:
            continue
        task_id = msgpack.unpackb(body)["task"]["task_id"]
        status, _ = await timed(stats, http, "POST", f"{url}/v1/updates/{task_id}", data=payload, headers=auth)
        stats.updates += status == 202


async def run(url: str, join_token: str, n: int, cycles: int, config: Path) -> dict:
    stats = Stats()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as http:
        joined = await asyncio.gather(*(join(http, url, join_token) for _ in range(n)))
        payload = payload_for(joined[0], config)  # every client declares the same memory: one plan
        t0 = time.perf_counter()
        await asyncio.gather(*(device(http, url, me["token"], cycles, payload, stats) for me in joined))
        wall = time.perf_counter() - t0
    lat = np.array(stats.latencies) * 1000
    return {"clients": n, "updates_per_s": round(stats.updates / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None, "errors": stats.errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--cycles", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, url = start_server(root)
        try:
            token = create_token(root / "state", "device")
            for n in args.clients:
                print(json.dumps(asyncio.run(run(url, token, n, args.cycles, root / "fed.toml"))), flush=True)
        finally:
            proc.terminate()
            proc.communicate(timeout=60)


if __name__ == "__main__":
    main()
