"""The Flower bridge end to end against a real stamen server process on loopback. Under Flower's
simulation engine: the bridge's ClientApp on simulated SuperNodes and the gateway ServerApp that
joins the server as a gpu client on each node's behalf; one task trained on a node moves the model.
Then as an operator runs it: ``flower-superlink``, two ``flower-supernode``s and ``flwr run`` of the
shipped app folder (``edge_client/flower_app``), each a real process, by the README's commands as
written; then ``flwr stop``."""

import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation_procs import ENV, free_port, running_server
from stamen.core.records import Capabilities
from stamen.edge_client.client import EdgeClient
from stamen.edge_client.flower import client_app, gateway_app
from stamen.edge_client.probe import capabilities, probe
from stamen.cli_federation import fetch_status
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
        return logs, fetch_status(url, create_token(state, "admin"))


@pytest.mark.timeout(180)
def test_two_flower_nodes_train_side_by_side_and_each_task_moves_the_model(tmp_path):
    """Each node is its own stamen client; their tasks are sent from two threads through the
    one Grid, and every reply reaches the client that sent the task. Each task trains its full
    steps, from the untrained model at version 0, and every update counts toward a version. (One
    run of two nodes: a run of one node, which asserted only that, cost a Ray start and a server
    of its own.)"""
    logs, status = simulated_gateway(tmp_path, buffer_k=2, nodes=2, max_tasks=2)
    assert len(logs) == 2 and all([e.outcome for e in log] == ["accepted", "accepted"] for log in logs)
    entries = [e for log in logs for e in log]
    assert all((e.steps, e.tokens) == (STEPS, STEPS * BATCH * SEQ) for e in entries)
    untrained = [e.first_loss for e in entries if e.base_version == 0]
    assert untrained and all(abs(loss - math.log(256)) < 0.5 for loss in untrained)  # ~uniform over 256 bytes
    assert status["version"] == 2  # four updates, two per version
    assert sorted((c["role"], c["updates"], c["tokens"]) for c in status["clients"]) == [
        ("gpu", 2, 2 * STEPS * BATCH * SEQ)] * 2
    assert status["tiers"]["gpu"] == {"updates": 4, "tokens": 4 * STEPS * BATCH * SEQ}


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_flower_commands() -> list[str]:
    """The shell command lines of the README's Flower section."""
    text = README.read_text()
    section = text[text.index("## GPU nodes through Flower"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [line for line in block.splitlines() if line.strip()]


def test_a_node_declares_its_own_hardware_and_the_gateway_joins_with_it(tmp_path, monkeypatch):
    """The node's ClientApp answers the gateway's query with its probe; an edge client given
    capabilities declares them instead of probing its own machine (here: a compute so slow that
    the server cuts the gpu tier's steps to one)."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):  # what a Flower runtime sets
        monkeypatch.setattr(TaskIdentity, name, value)
    query = Message(content=RecordDict(), dst_node_id=7, message_type="query")
    context = Context(run_id=1, node_id=7, node_config={"threads": 1}, state=RecordDict(), run_config={})
    reply = client_app(message=query, context=context)
    declared = Capabilities.from_dict(json.loads(str(reply.content["capabilities"]["json"])))
    expected = capabilities(probe(), "gpu", ("torch",), declared.flops)
    assert declared.flops > 0 and declared == dataclasses.replace(expected, memory_bytes=declared.memory_bytes)
    slow = dataclasses.replace(declared, flops=1e3)
    with running_server(tmp_path, FED) as (url, state):
        [entry] = EdgeClient(url, create_token(state, "gpu"), "stdlib", runtime="torch", role="gpu", max_tasks=1,
                             progress=False, capabilities=slow).run()
    assert (entry.outcome, entry.steps) == ("accepted", 1)


def flower_env(home: Path) -> dict[str, str]:
    """Each Flower process its own FLWR_HOME, so nothing is read from or written to ~/.flwr; BIN on
    PATH, where they find flower-superexec, flwr-serverapp and flwr-clientapp to start (what
    the README's ``. .venv/bin/activate`` does)."""
    home.mkdir(parents=True, exist_ok=True)
    return {**ENV, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{ENV.get('PATH', '')}"}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A long-running process, from the checkout's root as the README's commands are, in its own
    process group: stopping the group also stops the SuperExec and app processes it spawned."""
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group at once (a SuperNode takes a few seconds to exit), then
    SIGKILL to the groups of those still running 20 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        if all(proc.poll() is not None for proc in procs):
            return


def wait_for(what: str, check, timeout: float):
    deadline = time.time() + timeout
    while not (value := check()):
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)
    return value


def wait_for_port(port: int, timeout: float) -> None:
    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(f"nothing listens on 127.0.0.1:{port}", listening, timeout)


def run_readme_commands(tmp_path: Path, url: str, state: Path) -> tuple[str, dict, dict]:
    """Run the README's Flower commands in order, with free ports for 8000, 9094 and 9095,
    ``tmp_path`` for ``$PWD``, the server's state folder for ``fed-state``, its URL for port 8080
    and the join token the token command printed. Before ``flwr stop`` it waits until each node
    has had two updates accepted. Returns what ``flwr run --stream`` printed and the server's
    status right after the stop and once nothing runs any more."""
    link, env = free_port(), flower_env(tmp_path / "flwr")
    admin = create_token(state, "admin")
    values = {"127.0.0.1:8000": f"127.0.0.1:{link}", "9094": str(free_port()), "9095": str(free_port()),
              "--state fed-state": f"--state {state}", "http://127.0.0.1:8080": url, "$PWD": str(tmp_path)}
    procs: list[subprocess.Popen] = []
    stream = tmp_path / "stream.log"

    def fill(arg: str) -> str:
        for placeholder, value in values.items():
            arg = arg.replace(placeholder, value)
        return arg

    try:
        for i, line in enumerate(readme_flower_commands()):
            if line.startswith(". "):  # `. .venv/bin/activate`: flower_env puts the venv's bin first on PATH
                continue
            argv = shlex.split(fill(line), comments=True)
            if argv[0] == "flower-superlink":
                procs.append(start([*argv, "--port", str(link)], env, tmp_path / "superlink.log"))
                wait_for_port(link, 60)
            elif argv[0] == "flower-supernode":
                procs.append(start(argv, env, tmp_path / f"supernode{i}.log"))
            elif argv[:2] == ["flwr", "run"]:
                procs.append(start(argv, env, stream))
                values["RUN_ID"] = wait_for("flwr run starts the run", lambda: re.search(
                    r"Successfully started run (\d+)", stream.read_text()), 60).group(1)
            elif argv[:2] == ["flwr", "stop"]:
                wait_for("two accepted updates per node", lambda: sorted(
                    c["updates"] for c in fetch_status(url, admin)["clients"]) >= [2, 2], 240)
                out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stdout + out.stderr
                stopped = time.time()
                after_stop = wait_for("no open task on the server", lambda: (
                    s if (s := fetch_status(url, admin))["in_flight"] == 0 else None), 30)
                released_s = time.time() - stopped
                procs[-1].wait(timeout=60)  # --stream returns once the run has ended
            else:  # the stamen commands
                assert argv[0] == "stamen", argv
                for _ in range(2 if argv[1] == "flower-config" else 1):  # the config step is safe to repeat
                    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
                    assert out.returncode == 0, out.stderr
                if argv[1:3] == ["token", "create"]:
                    values["stj_gpu_..."] = out.stdout.strip()
        [run] = json.loads(subprocess.run(["flwr", "ls", "stamen", "--run-id", values["RUN_ID"], "--format", "json"],
                                          env=env, capture_output=True, text=True, timeout=60).stdout)["runs"]
    finally:
        stop(procs)
    print(f"flwr stop: no open task {released_s:.1f} s later")
    return stream.read_text(), after_stop, {**fetch_status(url, admin), "run": run}


@pytest.mark.timeout(420)
def test_the_readme_flower_commands_train_for_the_server_and_flwr_stop_leaves_no_open_task(tmp_path):
    """Stock Flower deployment processes, started by the README's commands as written."""
    with running_server(tmp_path, FED.replace("buffer_k = 1", "buffer_k = 2")) as (url, state):
        streamed, after_stop, final = run_readme_commands(tmp_path, url, state)
        times = task_times(state)

    assert final["run"]["status"] == "finished:stopped"
    assert after_stop["in_flight"] == 0 and "open" not in after_stop["tasks"]
    assert after_stop["tasks"].get("released", 0) >= 1  # the nodes' open tasks were given back
    assert final["tasks"] == after_stop["tasks"]
    updates = sorted(c["updates"] for c in final["clients"])
    assert [c["role"] for c in final["clients"]] == ["gpu", "gpu"] and updates[0] >= 2
    assert final["tiers"]["gpu"] == {"updates": sum(updates), "tokens": sum(updates) * STEPS * BATCH * SEQ}
    # The gateway's log reached `flwr run --stream`: the nodes, each task, each upload.
    assert "gateway: training for" in streamed
    assert len(re.findall(r"node \d+: t\d+ sent \(3 steps from v\d+\)", streamed)) >= sum(updates)
    assert len(re.findall(r"node \d+: t\d+ trained in", streamed)) >= sum(updates)
    assert len(re.findall(r": v\d+ gpu on \w+, 3 steps, .*: accepted", streamed)) == sum(updates)
    # Each task ran in a new ClientApp process; the node folder carried AdamW across them.
    for node in ("node1", "node2"):
        [saved] = (tmp_path / node).glob("optimizer-*.pt")
        steps = {int(m["step"]) for m in torch.load(saved, weights_only=True)["state"]["state"].values()}
        assert len(steps) == 1 and steps.pop() in range(2 * STEPS, 20 * STEPS, STEPS)
    print("time per node task (issue to accepted update):", {c: [round(t, 1) for t in ts] for c, ts in times.items()})


def task_times(state: Path) -> dict[str, list[float]]:
    """Seconds from issue to accepted update of each done task, per client (the server's ledger)."""
    db = sqlite3.connect(f"file:{state / 'tasks.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT client_id, closed - issued FROM tasks WHERE status = 'done' ORDER BY id").fetchall()
    db.close()
    out: dict[str, list[float]] = {}
    for client, seconds in rows:
        out.setdefault(client, []).append(seconds)
    return out


def test_stamen_flower_config_is_safe_to_repeat(tmp_path):
    env = flower_env(tmp_path / "flwr")
    for address in ("127.0.0.1:8000", "127.0.0.1:8000", "10.0.0.2:9000"):
        out = subprocess.run([sys.executable, "-m", "stamen", "flower-config", "--insecure", "--superlink", address],
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        config = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())
        assert config["superlink"]["stamen"] == {"address": address, "insecure": True}
    listed = subprocess.run([str(BIN / "flwr"), "config", "ls"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "stamen" in listed.stdout
    (tmp_path / "flwr" / "config.toml").write_text("[superlink\n")  # a broken file: one line, exit 2, untouched
    out = subprocess.run([sys.executable, "-m", "stamen", "flower-config", "--insecure"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert (out.returncode, len(out.stderr.strip().splitlines())) == (2, 1) and "valid TOML" in out.stderr
    assert (tmp_path / "flwr" / "config.toml").read_text() == "[superlink\n"
