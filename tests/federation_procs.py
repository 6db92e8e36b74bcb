"""Real processes for the HTTP tests: a ``stamen`` server on an ephemeral loopback port and
edge clients, each its own Python process, plus folders of disjoint stdlib text for data."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from contextlib import contextmanager
import sys
import sysconfig
import time
from pathlib import Path

SERVER = """
import sys
from stamen.cli import setup_logging
from stamen.server.app import run_server
setup_logging(0)
run_server(sys.argv[4], sys.argv[1], sys.argv[2] if sys.argv[2] != "-" else None, "127.0.0.1", int(sys.argv[3]),
           *sys.argv[5:7])
"""
CLIENT = """
import sys, json
from stamen.edge_client.client import EdgeClient
c = EdgeClient(sys.argv[1], sys.argv[2], sys.argv[3], role=sys.argv[4], max_memory=int(sys.argv[5]),
               state_dir=sys.argv[6], max_tasks=int(sys.argv[7]), progress=False)
for entry in c.run():
    print("TASK", json.dumps(entry.__dict__), flush=True)
"""
DEVICE = """
import json, sys
from stamen.mobile_bridge.device import run_device
log = run_device(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], max_tasks=int(sys.argv[6]),
                 memory_bytes=int(sys.argv[7]))
print("LOG", json.dumps([entry.__dict__ for entry in log]))
print("MODULES", json.dumps(sorted(m for m in sys.modules if m.startswith("stamen"))))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stamen(*args) -> subprocess.CompletedProcess:
    """``python -m stamen ARGS`` as a user runs it: output captured, the exit code kept."""
    return subprocess.run([sys.executable, "-m", "stamen", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


EACH = """
import contextlib, io, json, sys
from stamen.cli import main
answers = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors end ``python -m stamen`` so
            code = e.code
    answers.append([code, err.getvalue()])
print(json.dumps(answers))
"""


def stamen_each(*argvs: list[str]) -> list[tuple[int, str]]:
    """(exit code, stderr) of ``stamen ARGV`` for each ARGV, all in one Python process that calls
    ``main(ARGV)`` as ``python -m stamen`` does: for mistakes found after the command has
    imported torch (and matplotlib, Ray), which cost 3-5 CPU-s in each process of their own."""
    r = subprocess.run([sys.executable, "-c", EACH, json.dumps([list(map(str, a)) for a in argvs])],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    return [tuple(answer) for answer in json.loads(r.stdout)]


def free_port() -> int:
    """A loopback port nothing listens on now (for processes that cannot report the one they bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(state: Path, config: Path | None = None, port: int = 0,
                 tls: tuple[Path, Path] | None = None, model: str = "gpt-tiny") -> tuple[subprocess.Popen, str]:
    """A server process; ``tls`` = (certificate, key) PEM files serves https. What it printed
    before serving is kept as ``proc.startup`` (start-up log lines)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(state), str(config or "-"), str(port), model,
                             *map(str, tls or ())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.time() + 180  # a deadline, not a timing: start-up took > 60 s on 2 shared cores at load 28
    proc.startup = ""
    for line in proc.stdout:
        proc.startup += line
        m = re.search(r"serving on (https?://\S+)", line)
        if m:
            return proc, m.group(1)
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stdout.read()}")


@contextmanager
def running_server(root: Path, federation: str):
    """A server process on a fresh state folder under ``root`` with the given federation TOML;
    yields (url, state folder) and stops the server afterwards."""
    (root / "fed.toml").write_text(federation)
    proc, url = start_server(root / "state", root / "fed.toml")
    try:
        yield url, root / "state"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def start_client(url: str, token: str, data: Path, role: str, max_memory: int, state: Path,
                 max_tasks: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLIENT, url, token, str(data), role, str(max_memory),
                             str(state), str(max_tasks)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)


def start_device(url: str, token: str, runtime: str, data: str | Path, cache: Path, max_tasks: int = 1,
                 memory_bytes: int = 8 << 20) -> subprocess.Popen:
    """A runtime-only reference device (``stamen device-emulator``'s code) in its own process."""
    return subprocess.Popen([sys.executable, "-c", DEVICE, url, token, runtime, str(data), str(cache), str(max_tasks),
                             str(memory_bytes)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def tagged(out: str, tag: str):
    """The JSON a device process printed after ``TAG ``."""
    return json.loads(next(line[len(tag) + 1:] for line in out.splitlines() if line.startswith(tag + " ")))


def stdlib_folders(root: Path, packages: list[list[str]]) -> list[Path]:
    """One data folder per client holding the named stdlib packages' sources (disjoint)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for i, names in enumerate(packages):
        folder = root / f"data{i}"
        for name in names:
            src = lib / name
            files = sorted(src.rglob("*.py")) if src.is_dir() else [lib / f"{name}.py"]
            for f in files:
                dest = folder / name / f.relative_to(lib).as_posix().replace("/", "__")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
        out.append(folder)
    return out
