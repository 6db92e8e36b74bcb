"""The Flower bridge: GPU nodes running stock Flower SuperNodes join a stamen federation.

A Flower ServerApp acts as a gateway. For each Flower node it runs one ``EdgeClient`` (HTTP to
the stamen server, role gpu, its own client identity, declaring the hardware the node reported)
whose training step is delegated to the node: ``FlowerNodeRuntime.train`` sends the task and the plan's weights to the node as a Flower
Message and waits for the trained weights and losses. The node's ClientApp
(``stamen.edge_client.flower_node``) trains the plan on its own data. Everything else (weights as
deltas, error feedback, the codec, uploads, retries) is the edge client's, so a Flower node is
scheduled and judged exactly like an HTTP gpu client; its data never leaves it.

The gateway's log goes to its stdout, which Flower forwards to ``flwr run --stream``. When the
run stops (``flwr stop``, Ctrl-C, a failed node) every node's client gives its open task back
to the stamen server at once (``DELETE /v1/tasks/{task}``) instead of leaving it to lapse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from stamen.core.model import ModelSpec
from stamen.core.records import Capabilities, Task
from stamen.core.train import TrainConfig, TrainResult
from stamen.edge_client.client import RELEASE_TIMEOUT_S, EdgeClient, TaskLog
from stamen.edge_client.flower_node import client_app, log_to_stdout
from stamen.edge_client.runtime import Batches, OnStep, Runtime

__all__ = ["client_app", "gateway_app", "server_app", "serve"]

# How often the gateway asks the SuperLink for a node's reply. Flower's Grid.send_and_receive
# sleeps 3 s between pulls, which added 1.5 s on average to every task.
POLL_S = 0.2

log = logging.getLogger(__name__)


class FlowerNodeRuntime(Runtime):
    """One task trained on a Flower node. The batch stream it is given is not used: the node
    draws the task's batches (batch size, seq len, seed) from its own data."""

    name = "torch"

    def __init__(self, grid: Grid, node_id: int, spec: ModelSpec, task: Task, stopped: threading.Event) -> None:
        self.grid, self.node_id, self.spec, self.task, self.stopped = grid, node_id, spec, task, stopped
        self.weights: dict[str, torch.Tensor] = {}
        self.trained: dict[str, torch.Tensor] = {}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = {n: t.contiguous() for n, t in weights.items()}

    def train(self, batches: Batches, steps: int, cfg: TrainConfig, step_offset: int = 0,
              on_step: OnStep | None = None) -> TrainResult:
        task = dataclasses.replace(self.task, steps=steps, train=cfg, step_offset=step_offset).to_dict()
        msg = Message(content=RecordDict({"weights": ArrayRecord(torch_state_dict=self.weights),
                                          "config": ConfigRecord({"model": self.spec.name,
                                                                  "task": json.dumps(task)})}),
                      dst_node_id=self.node_id, message_type="train")
        start = time.monotonic()
        [msg_id] = self.grid.push_messages([msg])
        log.info("node %s: %s sent (%d steps from v%d)", self.node_id, self.task.task_id, steps, self.task.base_version)
        # Wait no longer than the server does: past the deadline the task is reissued anyway.
        while not (replies := list(self.grid.pull_messages([msg_id]))):
            if self.stopped.is_set():
                raise RuntimeError(f"gateway stopped while node {self.node_id} trained task {self.task.task_id}")
            if time.time() > self.task.deadline:
                raise RuntimeError(f"Flower node {self.node_id} did not answer task {self.task.task_id} in time")
            time.sleep(POLL_S)
        reply = replies[0]
        if reply.has_error():
            raise RuntimeError(f"Flower node {self.node_id} failed task {self.task.task_id}: {reply.error.reason}")
        self.trained = reply.content["weights"].to_torch_state_dict()
        result = reply.content["result"]
        losses = [float(x) for x in result["losses"]]
        log.info("node %s: %s trained in %.1f s (%.1f s of it training on the node)", self.node_id,
                 self.task.task_id, time.monotonic() - start, float(result["train_s"]))
        for i, loss in enumerate(losses):
            if on_step:
                on_step(i, loss)
        return TrainResult(int(result["steps"]), int(result["tokens"]), losses)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return self.trained


class _Gateway:
    """One edge client per node, on an event loop in a background thread, so the main thread
    stays free to take a stop (a signal, or Flower's exit handlers) and ``stop`` can cancel the
    clients and wait while each gives its open task back."""

    def __init__(self, clients: list[EdgeClient], stopped: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(self._run(clients))
        self.stopped, self.finished = stopped, threading.Event()
        self.result: list[list[TaskLog]] = []
        self.error: BaseException | None = None
        threading.Thread(target=self._thread, name="stamen-gateway", daemon=True).start()

    @staticmethod
    async def _run(clients: list[EdgeClient]) -> list[list[TaskLog]]:
        async with asyncio.TaskGroup() as group:  # one client failing stops (and releases) all
            runs = [group.create_task(c.run_async()) for c in clients]
        return [r.result() for r in runs]

    def _thread(self) -> None:
        try:
            self.result = self.loop.run_until_complete(self.task)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as is
            self.error = e
        finally:
            self.stopped.set()  # ends the node runtimes' waits, so the executor can shut down
            self.finished.set()
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def stop(self) -> None:
        """Cancel every client and wait (bounded) until they have given their tasks back."""
        if not self.finished.is_set():
            log.info("gateway: stopping; giving open tasks back to the stamen server")
            self.loop.call_soon_threadsafe(self.task.cancel)
            self.finished.wait(RELEASE_TIMEOUT_S + 1)

    def wait(self) -> list[list[TaskLog]]:
        try:
            while not self.finished.wait(0.5):  # a timed wait lets signals in
                pass
        except BaseException:
            self.stop()
            raise
        if self.error is not None:
            raise self.error
        return self.result


def node_capabilities(grid: Grid, node_ids: list[int], timeout: float = 300.0) -> dict[int, Capabilities]:
    """Each node's own declaration (hardware probe, measured FLOP/s), asked with a Flower query
    message: the server sizes a task by the compute of the machine that trains it."""
    asked = {mid: n for n, mid in zip(node_ids, grid.push_messages(
        [Message(content=RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]))}
    caps: dict[int, Capabilities] = {}
    deadline = time.time() + timeout
    while asked:
        for reply in grid.pull_messages(list(asked)):
            node = asked.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                raise RuntimeError(f"Flower node {node} did not declare its hardware: {reply.error.reason}")
            caps[node] = Capabilities.from_dict(json.loads(str(reply.content["capabilities"]["json"])))
        if asked and time.time() > deadline:
            raise RuntimeError(f"Flower node(s) {', '.join(map(str, asked.values()))} did not answer in {timeout:.0f} s")
        time.sleep(POLL_S if asked else 0)
    return caps


def serve(grid: Grid, server: str, join_token: str, nodes: int = 1, max_tasks: int | None = None,
          ca_file: str | None = None) -> list[list[TaskLog]]:
    """Wait for ``nodes`` Flower nodes, then train for the stamen ``server`` through each of them
    (``max_tasks`` tasks each, or until stopped). Returns each node's task log."""
    log.info("gateway: waiting for %d Flower node(s)", nodes)
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:  # nodes register in the background
        time.sleep(0.1)
    log.info("gateway: training for %s through node(s) %s", server, ", ".join(map(str, node_ids)))
    caps = node_capabilities(grid, node_ids)
    stopped = threading.Event()

    def client(node_id: int) -> EdgeClient:
        return EdgeClient(server, join_token, "stdlib", runtime="torch", role="gpu", max_tasks=max_tasks,
                          progress=False, ca_file=ca_file, capabilities=caps[node_id],
                          runtime_factory=lambda spec, task: FlowerNodeRuntime(grid, node_id, spec, task, stopped))

    gateway = _Gateway([client(n) for n in node_ids], stopped)
    # `flwr stop`: the ServerApp's heartbeat learns of it and Flower exits the process through
    # its exit handlers, a few seconds before it forces the exit; give the tasks back first.
    add_exit_handler(gateway.stop, run_before_force_exit=True)
    logs = gateway.wait()
    log.info("gateway: done, %s", "; ".join(f"node {n}: {len(entries)} task(s)" for n, entries in zip(node_ids, logs)))
    return logs


def gateway_app(server: str, join_token: str, nodes: int = 1, max_tasks: int | None = None,
                ca_file: str | None = None, logs: list | None = None) -> ServerApp:
    """A gateway ServerApp bound to one stamen server; ``logs`` (if given) receives each node's
    task log when it ends."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        result = serve(grid, server, join_token, nodes, max_tasks, ca_file)
        if logs is not None:
            logs.extend(result)

    return app


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """For ``flwr run``: run_config ``stamen-server``, ``stamen-join-token``, ``stamen-nodes`` and
    ``stamen-max-tasks`` (tasks per node, after which the run ends; 0 trains until ``flwr stop``)."""
    log_to_stdout()
    cfg = context.run_config
    serve(grid, str(cfg["stamen-server"]), str(cfg["stamen-join-token"]), int(cfg.get("stamen-nodes", 1)),
          int(cfg.get("stamen-max-tasks", 0)) or None)
