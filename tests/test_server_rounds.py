"""``stamen server`` runs synchronous rounds (``[aggregation] mode = "rounds"``): with
tau_max = 0 and K = the cohort, each version equals synchronous FedAvg exactly, over HTTP
against a real server process, and the scheduler issues only the round's (over-selected) tasks."""

import json

import msgpack
import torch

from federation_procs import running_server
from stamen.compression.codecs import encode
from stamen.compression.downlink import decode_download
from stamen.core.model import PRESETS
from stamen.core.plan import full_plan
from stamen.core.records import Task
from stamen.server.auth import create_token
from test_server_http import call

CFG = PRESETS["gpt-tiny"]
FED = """
[aggregation]
mode = "rounds"
buffer_k = 3
tau_max = 0
outer = "fedavg"
outer_lr = 1.0
[scheduler]
overselect = 1.3
"""
TOKENS = (64, 64, 128)  # weights summing to a power of two: the mean of dyadic deltas is exact


def join(url, state):
    caps = {"role": "device", "memory_bytes": 2**30, "flops": 1e12, "runtimes": ["torch"], "device_class": "jetson"}
    body = msgpack.packb({"join_token": create_token(state, "device"), "capabilities": caps})
    status, me = call(url + "/v1/join", "POST", body)
    assert status == 200 and me["tier"] == "jetson", me
    return me["token"]


def delta(task: Task, seed: int) -> dict[str, torch.Tensor]:
    """Small integers times 2^-12, so every sum and the division by 256 are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    shapes = task.plan.shapes(CFG)
    return {n: torch.randint(-8, 9, shapes[n], generator=g).float() * 2.0**-12 for n in task.plan.trainable(CFG)}


def weights(url, admin, version):
    status, data = call(f"{url}/v1/weights/{version}?plan={full_plan(CFG).hash}", token=admin)
    assert status == 200
    return decode_download(data)[1]


def fedavg(theta, deltas, tokens):
    """Synchronous FedAvg, written out in float64: θ − Σ t_i Δ_i / Σ t_i on the trained tensors."""
    out = dict(theta)
    for n in deltas[0]:
        mean = sum(t * d[n].double() for t, d in zip(tokens, deltas)) / sum(tokens)
        out[n] = (theta[n].double() - mean).float()
    return out


def test_rounds_over_http_equal_synchronous_fedavg(tmp_path):
    with running_server(tmp_path, FED) as (url, state):
        admin = create_token(state, "admin")
        clients = [join(url, state) for _ in range(5)]
        theta = weights(url, admin, 0)
        for rnd in range(2):
            # A round over-selects ceil(1.3 x 3) = 4 tasks, all at the round's version; the
            # fifth client gets none until the round closes.
            asking, idle = (clients[:4], clients[4]) if rnd == 0 else ([clients[4], *clients[:3]], clients[3])
            tasks = []
            for c in asking:
                status, answer = call(url + "/v1/task?wait=0", token=c)
                assert status == 200, answer
                tasks.append(Task.from_dict(answer["task"]))
            assert {t.base_version for t in tasks} == {rnd}
            assert call(url + "/v1/task?wait=0", token=idle)[0] == 204
            deltas = [delta(t, 10 * rnd + i) for i, t in enumerate(tasks[:3])]
            for i, (c, t, d) in enumerate(zip(asking, tasks, deltas)):
                body = encode(d, "fp32+zstd(1)", meta={"tokens": TOKENS[i], "loss": 1.0})
                status, answer = call(url + f"/v1/updates/{t.task_id}", "POST", body, c)
                assert (status, answer["version"]) == (202, rnd + (i == 2)), answer
            # The fourth, over-selected task arrives after its round closed: refused as stale.
            body = encode(delta(tasks[3], 99), "fp32+zstd(1)", meta={"tokens": 64, "loss": 1.0})
            status, reason = call(url + f"/v1/updates/{tasks[3].task_id}", "POST", body, asking[3])
            assert status == 409 and "stale" in reason
            got, want = weights(url, admin, rnd + 1), fedavg(theta, deltas, TOKENS)
            assert all(torch.equal(got[n], want[n]) for n in want), "version != synchronous FedAvg"
            assert any(not torch.equal(got[n], theta[n]) for n in want)
            theta = got
        status = json.loads(call(url + "/v1/status", token=admin)[1])
        assert status["version"] == 2 and status["buffered"] == 0
        assert status["global_step"] == 2 * tasks[0].steps
