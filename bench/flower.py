"""Time per task of a GPU node on Flower against an HTTP gpu client doing the same work, in one run.

One stamen server (gpt-tiny, the federation's gpu tier: by default 200 steps of 16 x 64 tokens)
and, side by side so both see the same machine load, two gpu clients training on the built-in
corpus, each on one CPU thread:
- ``stamen client --role gpu`` over HTTP;
- a Flower SuperNode (``flower-supernode``, node_config ``threads=1``) that the gateway ServerApp
  feeds under ``flwr run``, as the README runs it, with ``flower-superlink``.
A task's time is what the server sees, from issuing it to accepting its update (its task
ledger), so both include weights down, training and upload; the Flower node's also include
Flower's message passing and a new ClientApp process per task. Prints one JSON line:
``{"steps", "http_s": [...], "flower_s": [...], "ratio"}``, ratio = median Flower task time /
median HTTP task time, over the tasks after each client's first.

    python bench/flower.py [--tasks 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stamen.server.config import load_config

APP = Path(__file__).resolve().parents[1] / "edge_client" / "flower_app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def task_times(state: Path) -> dict[str, list[float]]:
    """Seconds from issue to accepted update of every done task, per client, in issue order."""
    db = sqlite3.connect(f"file:{state / 'tasks.db'}?mode=ro", uri=True)
    out: dict[str, list[float]] = {}
    for client, issued, closed in db.execute("SELECT client_id, issued, closed FROM tasks WHERE status = 'done' "
                                             "ORDER BY id"):
        out.setdefault(client, []).append(closed - issued)
    db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=3, help="tasks per client (the first is not counted)")
    ap.add_argument("--steps", type=int, help="the gpu tier's steps per task (default: the federation's, 200)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stamen-bench-flower-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_HOME": str(root / "flwr"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    stamen = [sys.executable, "-m", "stamen"]
    fed = root / "fed.toml"
    fed.write_text(f"[tiers.gpu]\nsteps = {args.steps}\n" if args.steps else "")
    state, port, link = root / "state", free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str, extra: dict | None = None) -> subprocess.Popen:
        with (root / f"{name}.log").open("w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, **(extra or {})},
                                          start_new_session=True))
        return procs[-1]

    try:
        start([*stamen, "server", "--model", "gpt-tiny", "--state", str(state), "--port", str(port),
               "--config", str(fed)], "server")
        wait_for_port(port)

        def token() -> str:
            return subprocess.run([*stamen, "token", "create", "--role", "gpu", "--state", str(state)], env=env,
                                  check=True, capture_output=True, text=True).stdout.strip()

        start([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
               "--port", str(link)], "superlink")
        start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
               "--port", str(free_port()), "--node-config", f'data="stdlib" state="{root / "node"}" threads=1'],
              "supernode")
        subprocess.run([*stamen, "flower-config", "--insecure", "--superlink", f"127.0.0.1:{link}"], env=env,
                       check=True, capture_output=True)
        wait_for_port(link)
        flwr = start([str(BIN / "flwr"), "run", str(APP), "stamen", "--stream", "-c",
                      f'stamen-server="{url}" stamen-join-token="{token()}" stamen-nodes=1 '
                      f'stamen-max-tasks={args.tasks}'], "flwr")
        http = start([*stamen, "client", "--server", url, "--token", token(), "--data", "stdlib", "--role", "gpu",
                      "--state", str(root / "http"), "--max-tasks", str(args.tasks)], "http", {"OMP_NUM_THREADS": "1"})
        for proc in (http, flwr):
            if proc.wait() != 0:
                raise RuntimeError(f"{proc.args[:3]} failed; logs in {root}")
        http_id = json.loads((root / "http" / "client.json").read_text())["client_id"]
        times = task_times(state)
        http_s = times.pop(http_id)
        [flower_s] = times.values()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    ratio = statistics.median(flower_s[1:]) / statistics.median(http_s[1:])
    print(json.dumps({"steps": load_config(fed).tiers["gpu"].steps, "http_s": [round(t, 1) for t in http_s],
                      "flower_s": [round(t, 1) for t in flower_s], "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
