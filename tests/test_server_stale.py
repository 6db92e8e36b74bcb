"""A 409 (stale) closes the task: the client's next poll gets fresh work from the current
version, instead of the same unmergeable task back until its deadline. Real server process."""

import json

import pytest

from federation_procs import running_server
from stamen.core.records import Task
from stamen.server.auth import create_token
from test_server_http import call, join, update_for

FED = "[aggregation]\nbuffer_k = 1\ntau_max = 0\n[scheduler]\ntask_deadline_s = 600.0\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("stale"), FED) as running:
        yield running


def test_stale_update_gets_409_and_fresh_work(server):
    url, state = server
    dev = create_token(state, "device")
    a, b = join(url, dev), join(url, dev)
    ta = Task.from_dict(call(url + "/v1/task?wait=1", token=a)[1]["task"])
    tb = Task.from_dict(call(url + "/v1/task?wait=1", token=b)[1]["task"])
    assert ta.base_version == tb.base_version == 0
    assert call(f"{url}/v1/updates/{ta.task_id}", "POST", update_for(ta), token=a)[0] == 202  # version 1
    status, reason = call(f"{url}/v1/updates/{tb.task_id}", "POST", update_for(tb), token=b)
    assert status == 409 and "stale" in reason
    fresh = Task.from_dict(call(url + "/v1/task?wait=1", token=b)[1]["task"])
    assert fresh.task_id != tb.task_id and fresh.base_version == 1
    status, reason = call(f"{url}/v1/updates/{tb.task_id}", "POST", update_for(tb), token=b)
    assert status == 410 and "closed" in reason  # the refused task stays closed
    assert call(f"{url}/v1/updates/{fresh.task_id}", "POST", update_for(fresh), token=b)[0] == 202
    status = json.loads(call(url + "/v1/status", token=create_token(state, "admin"))[1])
    assert status["version"] == 2 and status["in_flight"] == 0
