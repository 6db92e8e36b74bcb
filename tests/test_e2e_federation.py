"""Acceptance 1 and 2 with real processes on loopback: a server, a gpu-role client and three
device-role clients with different plans on disjoint stdlib packages; then a SIGKILL of the
server mid-run and a restart on the same state folder."""

import json
import time
import urllib.request

import pytest
import torch

from federation_procs import free_port, start_client, start_server, stdlib_folders
from stamen.compression.codecs import decode
from stamen.core.data import Shard, folder_corpus
from stamen.core.model import GPT, PRESETS, ModelSpec, load_weights
from stamen.core.plan import full_plan, tier_plans
from stamen.core.train import evaluate
from stamen.server.auth import create_token
from stamen.server.store import Store

CFG = PRESETS["gpt-tiny"]
MiB = 2**20
# Memory that fits exactly one device tier each at batch 8 x seq 64 (phone-low 2.9, phone-high
# 5.7, laptop 10.0, jetson 15.5 MiB): three devices, three different plans.
DEVICE_MEMORY = {"phone-low": 4 * MiB, "phone-high": 8 * MiB, "laptop": 12 * MiB}
# The devices train on ORT (on CPU the edge client's first runtime), from the bundles the server publishes.
EXPORTS = [dict(spec=ModelSpec("gpt-tiny"), plan=tier_plans(CFG)[tier], runtime="ort") for tier in DEVICE_MEMORY]
FED = """
[aggregation]
buffer_k = 3
tau_max = 6
[training]
seq_len = 64
warmup_steps = 5
total_steps = 400
[tiers.gpu]
steps = 30
batch_size = 8
[tiers.laptop]
steps = 12
[tiers.phone-high]
steps = 12
[tiers.phone-low]
steps = 12
[tiers.jetson]
steps = 12
"""


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def full_weights(url, admin, version):
    return decode(get(f"{url}/v1/weights/{version}?plan={full_plan(CFG).hash}", admin)).tensors


def val_loss(weights, val):
    model = GPT(CFG)
    load_weights(model, weights)
    return evaluate(model, val)


def tasks_of(out):
    return [json.loads(line[5:]) for line in out.splitlines() if line.startswith("TASK ")]


@pytest.mark.timeout(300)
def test_mixed_federation_over_http(tmp_path):
    (tmp_path / "fed.toml").write_text(FED)
    state = tmp_path / "state"
    server, url = start_server(state, tmp_path / "fed.toml")
    try:
        admin, gpu_tok, dev_tok = (create_token(state, r) for r in ("admin", "gpu", "device"))
        data = stdlib_folders(tmp_path, [["json", "csv"], ["email"], ["logging"], ["asyncio"], ["collections"]])
        val_corpus = folder_corpus(data[4])
        val = Shard(val_corpus, val_corpus.doc_bounds).fixed_batches(4, 8, 64, seed=0)
        w0 = full_weights(url, admin, 0)
        clients = [start_client(url, gpu_tok, data[0], "gpu", 2**30, tmp_path / "c0", 3)]
        for i, mem in enumerate(DEVICE_MEMORY.values(), 1):
            clients.append(start_client(url, dev_tok, data[i], "device", mem, tmp_path / f"c{i}", 3))
        outs = [c.communicate(timeout=240)[0] for c in clients]
        for c, out in zip(clients, outs):
            assert c.returncode == 0, out
        logs = [tasks_of(o) for o in outs]
        assert [len(x) for x in logs] == [3, 3, 3, 3]
        assert [x[0]["tier"] for x in logs] == ["gpu", *DEVICE_MEMORY]
        assert all(t["outcome"] == "accepted" for x in logs for t in x)
        status = json.loads(get(url + "/v1/status", admin))
        assert status["version"] == 4 and status["buffered"] == 0  # 12 updates / K=3
        assert status["tensors"]["covered"] == status["tensors"]["total"] == len(w0)
        for tier, x in zip(["gpu", *DEVICE_MEMORY], logs):
            assert status["tiers"][tier] == {"updates": 3, "tokens": sum(t["tokens"] for t in x)}
        assert sorted(c["tier"] for c in status["clients"]) == sorted(["gpu", *DEVICE_MEMORY])
        metrics = get(url + "/metrics", admin).decode()
        for tier, x in zip(["gpu", *DEVICE_MEMORY], logs):
            assert f'stamen_tier_tokens_total{{tier="{tier}"}} {sum(t["tokens"] for t in x)}' in metrics
        for c in status["clients"]:
            assert f'stamen_client_updates_total{{client="{c["client_id"]}",tier="{c["tier"]}",role="{c["role"]}"}} 3' in metrics
        w4 = full_weights(url, admin, 4)
        before, after = val_loss(w0, val), val_loss(w4, val)
        assert after < before - 0.3, (before, after)
        assert all(not torch.equal(w0[n], w4[n]) for n in w0)  # every tensor moved
    finally:
        server.terminate()
        server.communicate(timeout=60)



@pytest.mark.timeout(300)
def test_server_killed_and_restarted_clients_carry_on(tmp_path):
    (tmp_path / "fed.toml").write_text(FED.replace("buffer_k = 3", "buffer_k = 2").replace("steps = 30", "steps = 12"))
    state, port = tmp_path / "state", free_port()
    server, url = start_server(state, tmp_path / "fed.toml", port)
    try:
        gpu_tok, dev_tok, admin = (create_token(state, r) for r in ("gpu", "device", "admin"))
        data = stdlib_folders(tmp_path, [["json"], ["email"]])
        clients = [start_client(url, gpu_tok, data[0], "gpu", 2**30, tmp_path / "c0", 4),
                   start_client(url, dev_tok, data[1], "device", 12 * MiB, tmp_path / "c1", 4)]
        while json.loads(get(url + "/v1/status", admin))["tasks"].get("done", 0) < 3:
            time.sleep(0.2)
        server.kill()  # SIGKILL: no drain, no checkpoint
        server.communicate(timeout=30)
        time.sleep(2)
        server, url2 = start_server(state, tmp_path / "fed.toml", port)
        assert url2 == url
        outs = [c.communicate(timeout=240)[0] for c in clients]
        for c, out in zip(clients, outs):
            assert c.returncode == 0, out
        acked = [t["task_id"] for o in outs for t in tasks_of(o) if t["outcome"] in ("accepted", "duplicate")]
        assert len(acked) == 8 == len(set(acked))
        status = json.loads(get(url + "/v1/status", admin))
    finally:
        server.terminate()
        server.communicate(timeout=60)
    store = Store(state)
    journaled = store.journaled_task_ids()
    assert sorted(journaled) == sorted(acked)  # every acknowledged update journaled once
    assert status["version"] * 2 + status["buffered"] == len(journaled)  # each applied exactly once
    assert status["tasks"]["done"] == 8
    store.close()
