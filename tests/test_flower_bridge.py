"""The Flower bridge end to end against a real stamen server process on loopback. Under Flower's
simulation engine: the bridge's ClientApp on simulated SuperNodes and the gateway ServerApp that
joins the server as a gpu client on each node's behalf; one task trained on a node moves the model.
Then as an operator runs it: ``flower-superlink``, two ``flower-supernode``s and ``flwr run`` of the
shipped app folder (``edge_client/flower_app``), each a real process."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation

from federation_procs import ENV, free_port, running_server
from stamen.edge_client.flower import client_app, gateway_app
from stamen.server.app import fetch_status
from stamen.server.auth import create_token

APP = Path(__file__).resolve().parents[1] / "edge_client" / "flower_app"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr
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


def simulated_gateway(root: Path, buffer_k: int, nodes: int, max_tasks: int) -> tuple[list, dict]:
    """The gateway and ``nodes`` Flower nodes under the simulation engine, against a real
    server; returns each node's task log and the server's status afterwards."""
    with running_server(root, FED.replace("buffer_k = 1", f"buffer_k = {buffer_k}")) as (url, state):
        logs: list = []
        app = gateway_app(url, create_token(state, "gpu"), nodes=nodes, max_tasks=max_tasks, logs=logs)
        run_simulation(app, client_app, num_supernodes=nodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        return logs, fetch_status(url)


@pytest.mark.timeout(120)
def test_a_flower_node_trains_one_task_for_the_stamen_server(tmp_path):
    logs, status = simulated_gateway(tmp_path, buffer_k=1, nodes=1, max_tasks=1)
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
    logs, status = simulated_gateway(tmp_path, buffer_k=2, nodes=2, max_tasks=2)
    assert len(logs) == 2 and all([e.outcome for e in log] == ["accepted", "accepted"] for log in logs)
    assert status["version"] == 2  # four updates, two per version
    assert sorted((c["role"], c["updates"]) for c in status["clients"]) == [("gpu", 2), ("gpu", 2)]
    assert status["tiers"]["gpu"] == {"updates": 4, "tokens": 4 * STEPS * BATCH * SEQ}



def flower_env(home: Path) -> dict[str, str]:
    """Each Flower process its own FLWR_HOME, so nothing is read from or written to ~/.flwr; BIN on
    PATH, where they find flower-superexec, flwr-serverapp and flwr-clientapp to start."""
    home.mkdir(parents=True, exist_ok=True)
    return {**ENV, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{ENV.get('PATH', '')}"}


def start(args: list[str], home: Path) -> subprocess.Popen:
    """A Flower process in its own process group: stopping the group also stops the SuperExec
    and app processes it spawned."""
    env = flower_env(home)
    with (home / "log").open("w") as log:
        return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def flwr(args: list[str], home: Path, timeout: float) -> str:
    out = subprocess.run([str(BIN / "flwr"), *args], env=flower_env(home), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.timeout(90)
def test_flwr_run_on_a_superlink_with_two_supernodes_trains_for_the_stamen_server(tmp_path):
    """Stock Flower deployment processes; the run ends by itself after ``stamen-max-tasks``."""
    with running_server(tmp_path, FED.replace("buffer_k = 1", "buffer_k = 2")) as (url, state):
        link_port, tasks = free_port(), 2
        cli = tmp_path / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(f'[superlink]\ndefault = "stamen"\n\n[superlink.stamen]\n'
                                         f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        procs = [start(["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                        "--port", str(link_port)], tmp_path / "superlink")]
        try:
            procs += [start(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                             "--port", str(free_port()), "--node-config",
                             f'data="stdlib" state="{tmp_path / f"node{i}" / "state"}"'], tmp_path / f"node{i}")
                      for i in range(2)]
            wait_for_port(link_port, 30)
            # --stream prints the ServerApp's log and returns when the run has ended.
            streamed = flwr(["run", str(APP), "stamen", "--stream", "-c", f'stamen-server="{url}"',
                             "-c", f'stamen-join-token="{create_token(state, "gpu")}"',
                             "-c", "stamen-nodes=2", "-c", f"stamen-max-tasks={tasks}"], cli, timeout=70)
            run_id = re.search(r"Successfully started run (\d+)", streamed).group(1)
            [run] = json.loads(flwr(["ls", "stamen", "--run-id", run_id, "--format", "json"], cli, timeout=30))["runs"]
            status = fetch_status(url)
        finally:
            for proc in procs:
                stop(proc)

    assert run["status"] == "finished:completed"
    assert status["version"] == 2  # four updates, two per version
    assert sorted((c["role"], c["updates"]) for c in status["clients"]) == [("gpu", tasks), ("gpu", tasks)]
    assert status["tiers"]["gpu"] == {"updates": 2 * tasks, "tokens": 2 * tasks * STEPS * BATCH * SEQ}
    # Each task ran in a new ClientApp process; the node folder carried AdamW across them.
    for i in range(2):
        [saved] = (tmp_path / f"node{i}" / "state").glob("optimizer-*.pt")
        moments = torch.load(saved, weights_only=True)["state"]["state"]
        assert {int(m["step"]) for m in moments.values()} == {tasks * STEPS}
