"""Acceptance 3: bad requests against a real server process each get a 4xx with a reason,
and the model does not change. Also: a lapsed task is refused, a re-sent upload is idempotent."""

import json
import math
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import torch

from federation_procs import running_server
from stamen.compression.codecs import encode
from stamen.core.model import PRESETS
from stamen.core.plan import full_plan
from stamen.core.records import Task
from stamen.server.auth import create_token

CFG = PRESETS["gpt-tiny"]
FED = "[server]\nmax_body_mib = 1\n[scheduler]\ntask_deadline_s = 10.0\n[aggregation]\nbuffer_k = 1\n"


def call(url, method="GET", body=None, token=None):
    """(status, parsed answer): msgpack for 2xx, the JSON reason for errors."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, (msgpack.unpackb(data) if data and r.headers.get_content_type() == "application/msgpack" else data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def join(url, join_token, mem=2**30):
    caps = {"role": "device", "memory_bytes": mem, "flops": 1e12, "runtimes": ["torch"]}
    status, me = call(url + "/v1/join", "POST", msgpack.packb({"join_token": join_token, "capabilities": caps}))
    assert status == 200, me
    return me["token"]


def update_for(task: Task, tokens=512, fill=0.01, **changes):
    shapes = task.plan.shapes(CFG)
    delta = {n: torch.full(shapes[n], fill) for n in task.plan.trainable(CFG)}
    for n, t in changes.items():
        delta[n] = t
    return encode(delta, "fp32+zstd(1)", meta={"tokens": tokens, "loss": 1.0})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("http"), FED) as running:
        yield running


def test_bad_requests_get_4xx_and_leave_the_model_unchanged(server):
    url, state = server
    admin, dev = create_token(state, "admin"), create_token(state, "device")
    a, b = join(url, dev), join(url, dev)
    full = f"{url}/v1/weights/0?plan={full_plan(CFG).hash}"
    before = call(full, token=admin)[1]
    status, answer = call(url + "/v1/task?wait=1", token=a)
    assert status == 200
    task = Task.from_dict(answer["task"])
    good = update_for(task)
    name = task.plan.trainable(CFG)[0]
    bad_shape = update_for(task, **{name: torch.zeros(3, 3)})
    nan = torch.full(task.plan.shapes(CFG)[name], 0.01)
    nan[0] = math.nan
    cases = [
        ("no token", ("GET", "/v1/task", None, None), 401, "missing Authorization"),
        ("wrong token", ("GET", "/v1/task", None, "stc_nope"), 401, "unknown token"),
        ("bad join token", ("POST", "/v1/join", msgpack.packb({"join_token": "x", "capabilities": {"role": "device", "memory_bytes": 1 << 30, "flops": 1.0}}), None), 401, "unknown join token"),
        ("another client's task", ("POST", f"/v1/updates/{task.task_id}", good, b), 403, "another client"),
        ("unknown task", ("POST", "/v1/updates/t999999999", good, a), 404, "unknown task"),
        ("oversized body", ("POST", f"/v1/updates/{task.task_id}", b"\0" * (2 << 20), a), 413, "larger than"),
        ("malformed msgpack", ("POST", f"/v1/updates/{task.task_id}", b"\xc1\xc1garbage", a), 422, "msgpack"),
        ("wrong shapes", ("POST", f"/v1/updates/{task.task_id}", bad_shape, a), 422, "shape"),
        ("NaN", ("POST", f"/v1/updates/{task.task_id}", update_for(task, **{name: nan}), a), 422, "NaN"),
        ("too many tokens", ("POST", f"/v1/updates/{task.task_id}", update_for(task, tokens=10**9), a), 422, "tokens"),
        ("other plan's weights", ("GET", f"/v1/weights/0?plan={full_plan(CFG).hash}", None, a), 403, "own plan"),
        ("bad version", ("GET", "/v1/weights/x?plan=p", None, a), 400, "not a non-negative integer"),
        ("join garbage", ("POST", "/v1/join", msgpack.packb([1]), None), 400, "msgpack map"),
    ]
    for label, (method, path, body, token), code, reason in cases:
        status, answer = call(url + path, method, body, token)
        assert (status, reason in answer) == (code, True), (label, status, answer)
    assert call(full, token=admin)[1] == before
    st = json.loads(call(url + "/v1/status", token=admin)[1])
    assert st["version"] == 0 and st["tasks"] == {"open": 1}
    # The good update is accepted (K=1 publishes version 1); a re-send is idempotent.
    assert call(url + f"/v1/updates/{task.task_id}", "POST", good, a) == (202, {"status": "accepted", "version": 1})
    assert call(url + f"/v1/updates/{task.task_id}", "POST", good, a) == (202, {"status": "duplicate", "version": 1})
    assert json.loads(call(url + "/v1/status", token=admin)[1])["version"] == 1


def test_an_upload_can_carry_the_next_task(server):
    """With ?next=1 the upload's answer also carries the client's next task, the one GET
    /v1/task then answers too (one request per cycle instead of two); without it the answer
    is as before, so clients that long-poll for every task keep working."""
    url, state = server
    c = join(url, create_token(state, "device"))
    first = Task.from_dict(call(url + "/v1/task?wait=1", token=c)[1]["task"])
    status, reason = call(url + f"/v1/updates/{first.task_id}?next=2", "POST", update_for(first), c)
    assert status == 400 and "next" in reason  # refused before anything changed: the upload below is accepted
    status, answer = call(url + f"/v1/updates/{first.task_id}?next=1", "POST", update_for(first), c)
    assert status == 202 and answer["status"] == "accepted"
    given = Task.from_dict(answer["task"])
    assert given.task_id != first.task_id and given.base_version == answer["version"]  # K = 1: the version it published
    db = sqlite3.connect(Path(state) / "tasks.db")  # its ledger row was written before the answer went out
    assert db.execute("SELECT status FROM tasks WHERE id = ?", (given.task_id,)).fetchone() == ("open",)
    db.close()
    assert call(url + "/v1/task?wait=0", token=c)[1]["task"] == answer["task"]  # the task the client now holds
    status, again = call(url + f"/v1/updates/{first.task_id}?next=1", "POST", update_for(first), c)  # answer lost, re-sent
    assert status == 202 and again["status"] == "duplicate" and again["task"] == answer["task"]
    status, plain = call(url + f"/v1/updates/{given.task_id}", "POST", update_for(given), c)
    assert status == 202 and plain["status"] == "accepted" and "task" not in plain


def test_polls_at_once_each_get_a_task_written_before_the_answer(server):
    """Polls that arrive together have their tasks' ledger rows written in one transaction:
    each still gets its own task, and its row is in the ledger when the answer arrives."""
    from concurrent.futures import ThreadPoolExecutor
    url, state = server
    join_token = create_token(state, "device")
    tokens = [join(url, join_token) for _ in range(8)]  # within the join burst
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: call(url + "/v1/task?wait=1", token=c), tokens))
    tasks = [Task.from_dict(a["task"]) for status, a in answers if status == 200]
    assert len(tasks) == 8 and len({t.task_id for t in tasks}) == 8
    db = sqlite3.connect(Path(state) / "tasks.db")
    rows = [db.execute("SELECT status, body FROM tasks WHERE id = ?", (t.task_id,)).fetchone() for t in tasks]
    db.close()
    assert all(r is not None and r[0] == "open" and Task.from_dict(json.loads(r[1])) == t for r, t in zip(rows, tasks))


def test_lapsed_task_is_refused(server):
    url, state = server
    c = join(url, create_token(state, "device"))
    task = Task.from_dict(call(url + "/v1/task?wait=1", token=c)[1]["task"])
    time.sleep(task.deadline - time.time() + 1.5)  # past the deadline and a maintenance tick
    status, reason = call(url + f"/v1/updates/{task.task_id}", "POST", update_for(task), c)
    assert status == 410 and "deadline" in reason


def test_a_released_task_closes_at_once_and_its_work_goes_to_the_next_poll(server):
    url, state = server
    dev = create_token(state, "device")
    a, b = join(url, dev), join(url, dev)
    admin = create_token(state, "admin")
    before = json.loads(call(url + "/v1/status", token=admin)[1])
    task = Task.from_dict(call(url + "/v1/task?wait=1", token=a)[1]["task"])
    assert call(url + f"/v1/tasks/{task.task_id}", "DELETE", token=a) == (200, {"status": "released"})
    assert call(url + f"/v1/tasks/{task.task_id}", "DELETE", token=b)[0] == 403  # not b's to give back
    assert call(url + "/v1/tasks/t999999999", "DELETE", token=a)[0] == 404
    after = json.loads(call(url + "/v1/status", token=admin)[1])
    assert after["in_flight"] == before["in_flight"]
    assert after["tasks"]["released"] == before["tasks"].get("released", 0) + 1
    # A re-sent release changes nothing; the upload of a released task is refused; the next
    # poll gets a new task.
    assert call(url + f"/v1/tasks/{task.task_id}", "DELETE", token=a) == (200, {"status": "released"})
    status, reason = call(url + f"/v1/updates/{task.task_id}", "POST", update_for(task), a)
    assert status == 410 and "closed" in reason
    again = Task.from_dict(call(url + "/v1/task?wait=1", token=a)[1]["task"])
    assert again.task_id != task.task_id


def test_a_request_past_the_request_timeout_answers_408(tmp_path):
    """The requests' timeouts are swept together (``app.Deadlines``), not a timer each: a long
    poll that outlasts ``request_timeout_s`` still answers 408 with its reason (at most a sweep,
    a quarter of the timeout here, late), and the server goes on answering."""
    fed = "[server]\nrequest_timeout_s = 0.4\nlong_poll_s = 20.0\n[scheduler]\nmax_in_flight = 1\n"
    with running_server(tmp_path, fed) as (url, state):
        dev = create_token(state, "device")
        a, b = join(url, dev), join(url, dev)
        assert call(url + "/v1/task?wait=0", token=a)[0] == 200  # the one device task in flight
        t0 = time.monotonic()
        status, reason = call(url + "/v1/task?wait=20", token=b)  # no task frees: it would wait 20 s
        assert status == 408 and "request timeout" in reason and time.monotonic() - t0 < 5
        assert call(url + "/v1/task?wait=0", token=b)[0] == 204
