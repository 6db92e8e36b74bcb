"""The server's state folder against an unlucky operator (issue 13's store defects): two servers
on one folder, a cut-short newest checkpoint, a checkpoint that fails to write (a file-size
limit, which fails the write exactly as a full disk does), a folder that cannot be written.
Real server processes on loopback, real SQLite and safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import torch

import crash_feeder as cf
from federation_procs import ENV, start_server, stamen
from stamen.compression.codecs import encode
from stamen.core.model import PRESETS
from stamen.core.records import Task
from stamen.server.auth import create_token
from stamen.server.store import Store

CFG = PRESETS["gpt-tiny"]
FED = "[aggregation]\nbuffer_k = 1\n[server]\ncheckpoint_every = 1\n"


def call(url: str, method: str = "GET", body: bytes | None = None, token: str | None = None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
            return r.status, msgpack.unpackb(data) if r.headers.get_content_type() == "application/msgpack" else data
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def join(url: str, state: Path) -> str:
    caps = {"role": "device", "memory_bytes": 4 << 20, "flops": 1e12, "runtimes": ["torch"]}  # a small plan
    status, me = call(url + "/v1/join", "POST", msgpack.packb({"join_token": create_token(state, "device"),
                                                                "capabilities": caps}))
    assert status == 200, me
    return me["token"]


def train_once(url: str, token: str) -> tuple[Task, int, object]:
    """Ask for a task and upload a small update for it: (task, HTTP status, answer)."""
    status, answer = call(url + "/v1/task?wait=5", token=token)
    assert status == 200, answer
    task = Task.from_dict(answer["task"])
    shapes = task.plan.shapes(CFG)
    body = encode({n: torch.full(shapes[n], 1e-3) for n in task.plan.trainable(CFG)}, "fp32+zstd(1)",
                  meta={"tokens": 64, "loss": 1.0})
    status, answer = call(f"{url}/v1/updates/{task.task_id}", "POST", body, token)
    return task, status, answer


def version(url: str, state: Path) -> int:
    request = urllib.request.Request(url + "/v1/status",
                                     headers={"Authorization": f"Bearer {create_token(state, 'admin')}"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())["version"]


def scored(url: str, state: Path) -> None:
    """Wait until the server has scored its current version (on its evaluation thread): only
    then does it stay idle."""
    admin = create_token(state, "admin")
    for _ in range(600):
        request = urllib.request.Request(url + "/v1/status", headers={"Authorization": f"Bearer {admin}"})
        status = json.loads(urllib.request.urlopen(request, timeout=60).read())
        if status["evaluations"] and status["evaluations"][-1]["version"] == status["version"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"version {status['version']} was never scored")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.communicate(timeout=60)


def contents(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stamen: error: ") and all(w in last for w in words), result.stderr


def serve_once(root: Path) -> tuple[Path, Path]:
    """A state folder a server has run on (one accepted update, then a clean stop)."""
    (root / "fed.toml").write_text(FED)
    state = root / "state"
    proc, url = start_server(state, root / "fed.toml")
    try:
        assert train_once(url, join(url, state))[1] == 202
    finally:
        stop(proc)
    return state, root / "fed.toml"


@pytest.mark.timeout(300)
def test_a_second_server_on_the_same_state_folder_is_refused_and_touches_nothing(tmp_path):
    (tmp_path / "fed.toml").write_text(FED.replace("checkpoint_every = 1", "checkpoint_every = 100"))  # the first stays idle
    state = tmp_path / "state"
    first, url = start_server(state, tmp_path / "fed.toml")
    try:
        token = join(url, state)
        assert train_once(url, token)[1] == 202
        scored(url, state)
        before = contents(state)
        second = subprocess.run([sys.executable, "-m", "stamen", "server", "--state", str(state), "--port", "0",
                                 "--config", str(tmp_path / "fed.toml")],
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert_one_line_error(second, str(state), "in use by another stamen server")
        assert contents(state) == before
        assert train_once(url, token)[1] == 202  # the first carries on
        assert version(url, state) == 2
    finally:
        stop(first)
    proc, url = start_server(state, tmp_path / "fed.toml")  # and resumes where it stopped
    try:
        assert version(url, state) == 2
    finally:
        stop(proc)


@pytest.mark.timeout(300)
def test_a_cut_short_newest_checkpoint_falls_back_to_the_previous_and_replays(tmp_path):
    reference, st = cf.feed(str(tmp_path))  # checkpoints every 2 versions
    st.close()
    newest, previous = sorted((tmp_path / "checkpoints").glob("ckpt-*.safetensors"), reverse=True)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    agg = Store(tmp_path).restore(cf.CFG, cf.CONFIG)
    assert agg.version == reference.version
    assert all(torch.equal(agg.weights[n], reference.weights[n]) for n in reference.weights)
    assert agg.buffer == reference.buffer and agg.seen == reference.seen
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*")) == [previous.name, newest.name + ".unreadable"]


@pytest.mark.timeout(300)
def test_a_server_resumes_past_a_corrupt_newest_checkpoint(tmp_path):
    state, fed = serve_once(tmp_path)
    newest = sorted((state / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    newest.write_bytes(b"\0" * 64)
    proc, url = start_server(state, fed)
    try:
        assert version(url, state) == 1
    finally:
        stop(proc)


@pytest.mark.timeout(300)
def test_no_readable_checkpoint_is_one_line_not_a_traceback(tmp_path):
    state, fed = serve_once(tmp_path)
    for path in (state / "checkpoints").glob("ckpt-*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    result = stamen("server", "--state", state, "--config", fed, "--port", "0")
    assert_one_line_error(result, "cannot resume")


@pytest.mark.timeout(300)
def test_a_read_only_state_folder_is_one_line_not_a_traceback(tmp_path):
    state, fed = serve_once(tmp_path)
    if os.geteuid() == 0:  # root writes through file modes: make the folder a read-only mount instead
        if subprocess.run(["mount", "--bind", "-o", "ro", str(state), str(state)], capture_output=True).returncode:
            pytest.skip("running as root without the right to mount: cannot make a folder read-only")
    else:
        for p in [state, *state.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        result = stamen("server", "--state", state, "--config", fed, "--port", "0")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(state)], check=True)
        else:
            for p in [state, *state.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert_one_line_error(result, str(state))


@pytest.mark.timeout(300)
def test_a_failed_checkpoint_keeps_the_accepted_update_and_closes_its_task(tmp_path):
    """A checkpoint that cannot be written after an update was journaled and applied: the client
    gets 202 (not 500, then "duplicate" on retry, with the task handed out again), the task is
    done, and the update survives a kill -9 and a restart."""
    (tmp_path / "fed.toml").write_text(FED)
    state = tmp_path / "state"
    proc, url = start_server(state, tmp_path / "fed.toml")
    try:
        token = join(url, state)
        checkpoint = max(p.stat().st_size for p in (state / "checkpoints").iterdir())
        # every later write past this offset fails (EFBIG), as on a full disk: the next checkpoint
        # does, the journal's small appends to its write-ahead log do not
        limit = max(checkpoint // 2, (state / "state.db-wal").stat().st_size + (512 << 10))
        assert limit < checkpoint
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        task, status, answer = train_once(url, token)
        assert (status, answer["status"]) == (202, "accepted"), answer
        time.sleep(1.0)  # the checkpoint, on its own thread, has failed by now
        assert not list((state / "checkpoints").glob("*.tmp"))  # the failed attempt cleaned up
        assert version(url, state) == 1
        status, tasks = call(url + "/v1/status", "GET", None, create_token(state, "admin"))
        assert json.loads(tasks)["tasks"] == {"done": 1}  # closed, not handed out again
        again, status, answer = train_once(url, token)
        assert again.task_id != task.task_id and status == 202
        assert version(url, state) == 2
    finally:
        stop(proc, signal.SIGKILL)
    proc, url = start_server(state, tmp_path / "fed.toml")
    try:
        assert version(url, state) == 2  # the journal replayed what no checkpoint held
    finally:
        stop(proc)
    journal = Store(state).journaled_task_ids()
    assert journal == [task.task_id, again.task_id]
