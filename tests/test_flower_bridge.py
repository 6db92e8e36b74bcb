"""The Flower bridge end to end: a real stamen server process on loopback, Flower's simulation
engine with one SuperNode running the bridge's ClientApp, and the gateway ServerApp that joins
the server as a gpu client on the node's behalf. One task trained on the node moves the model."""

import json
import math
import urllib.request

import pytest
from flwr.simulation import run_simulation

from federation_procs import running_server
from stamen.edge_client.flower import client_app, gateway_app
from stamen.server.auth import create_token

STEPS, BATCH, SEQ = 3, 4, 32
FED = f"""
[aggregation]
buffer_k = 1
[training]
seq_len = {SEQ}
[tiers.gpu]
steps = {STEPS}
batch_size = {BATCH}
"""


@pytest.mark.timeout(120)
def test_a_flower_node_trains_one_task_for_the_stamen_server(tmp_path):
    with running_server(tmp_path, FED) as (url, state):
        logs: list = []
        app = gateway_app(url, create_token(state, "gpu"), nodes=1, max_tasks=1, logs=logs)
        run_simulation(app, client_app, num_supernodes=1,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as r:
            status = json.loads(r.read())

    [[entry]] = logs
    assert (entry.outcome, entry.version, entry.steps, entry.tokens) == ("accepted", 1, STEPS, STEPS * BATCH * SEQ)
    assert abs(entry.first_loss - math.log(256)) < 0.5  # an untrained byte model: ~uniform over 256
    assert status["version"] == 1
    assert status["tiers"]["gpu"] == {"updates": 1, "tokens": STEPS * BATCH * SEQ}
    [client] = status["clients"]
    assert (client["role"], client["updates"], client["tokens"]) == ("gpu", 1, STEPS * BATCH * SEQ)


@pytest.mark.timeout(180)
def test_two_flower_nodes_train_side_by_side(tmp_path):
    """Each node is its own stamen client; their tasks are sent from two threads through the
    one Grid, and every reply reaches the client that sent the task."""
    with running_server(tmp_path, FED.replace("buffer_k = 1", "buffer_k = 2")) as (url, state):
        logs: list = []
        app = gateway_app(url, create_token(state, "gpu"), nodes=2, max_tasks=2, logs=logs)
        run_simulation(app, client_app, num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        with urllib.request.urlopen(f"{url}/v1/status", timeout=30) as r:
            status = json.loads(r.read())

    assert len(logs) == 2 and all([e.outcome for e in log] == ["accepted", "accepted"] for log in logs)
    assert status["version"] == 2  # four updates, two per version
    assert sorted((c["role"], c["updates"]) for c in status["clients"]) == [("gpu", 2), ("gpu", 2)]
    assert status["tiers"]["gpu"] == {"updates": 4, "tokens": 4 * STEPS * BATCH * SEQ}
