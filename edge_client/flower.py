"""The Flower bridge: GPU nodes running stock Flower SuperNodes join a stamen federation.

A Flower ServerApp acts as a gateway. For each Flower node it runs one ``EdgeClient`` (HTTP to
the stamen server, role gpu, its own client identity) whose training step is delegated to the
node: ``FlowerNodeRuntime.train`` sends the task and the plan's weights to the node as a Flower
Message and waits for the trained weights and losses. The node's ClientApp trains the plan with
``TorchRuntime`` on its own data (node_config ``data``, default ``stdlib``). Everything else
(weights as deltas, error feedback, the codec, uploads, retries) is the edge client's, so a
Flower node is scheduled and judged exactly like an HTTP gpu client; its data never leaves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from stamen.core.data import Shard, load_corpus
from stamen.core.model import ModelSpec
from stamen.core.plan import Plan
from stamen.core.records import Task
from stamen.core.train import TrainConfig, TrainResult, default_device
from stamen.edge_client.client import EdgeClient, TaskLog
from stamen.edge_client.runtime import Batches, OnStep, Runtime, TorchRuntime


class FlowerNodeRuntime(Runtime):
    """One task trained on a Flower node. The batch stream it is given is not used: the node
    draws the task's batches (batch size, seq len, seed) from its own data."""

    name = "torch"

    def __init__(self, grid: Grid, node_id: int, spec: ModelSpec, task: Task) -> None:
        self.grid, self.node_id, self.spec, self.task = grid, node_id, spec, task
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
        # Wait no longer than the server does: past the deadline the task is reissued anyway.
        replies = list(self.grid.send_and_receive([msg], timeout=max(1.0, self.task.deadline - time.time())))
        if not replies:
            raise RuntimeError(f"Flower node {self.node_id} did not answer task {self.task.task_id} in time")
        reply = replies[0]
        if reply.has_error():
            raise RuntimeError(f"Flower node {self.node_id} failed task {self.task.task_id}: {reply.error.reason}")
        self.trained = reply.content["weights"].to_torch_state_dict()
        result = reply.content["result"]
        losses = [float(x) for x in result["losses"]]
        for i, loss in enumerate(losses):
            if on_step:
                on_step(i, loss)
        return TrainResult(int(result["steps"]), int(result["tokens"]), losses)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return self.trained


async def _serve_nodes(grid: Grid, node_ids: list[int], server: str, join_token: str,
                       max_tasks: int | None, ca_file: str | None) -> list[list[TaskLog]]:
    def client(node_id: int) -> EdgeClient:
        return EdgeClient(server, join_token, "stdlib", runtime="torch", role="gpu", max_tasks=max_tasks,
                          progress=False, ca_file=ca_file,
                          runtime_factory=lambda spec, task: FlowerNodeRuntime(grid, node_id, spec, task))

    return list(await asyncio.gather(*(client(n).run_async() for n in node_ids)))


def serve(grid: Grid, server: str, join_token: str, nodes: int = 1, max_tasks: int | None = None,
          ca_file: str | None = None) -> list[list[TaskLog]]:
    """Wait for ``nodes`` Flower nodes, then train for the stamen ``server`` through each of them
    (``max_tasks`` tasks each, or until stopped). Returns each node's task log."""
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:  # nodes register in the background
        time.sleep(0.1)
    return asyncio.run(_serve_nodes(grid, node_ids, server, join_token, max_tasks, ca_file))


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
    cfg = context.run_config
    serve(grid, str(cfg["stamen-server"]), str(cfg["stamen-join-token"]), int(cfg.get("stamen-nodes", 1)),
          int(cfg.get("stamen-max-tasks", 0)) or None)


@functools.lru_cache(maxsize=2)
def _shard(data: str) -> Shard:
    corpus = load_corpus(data)
    return Shard(corpus, corpus.doc_bounds)


@functools.lru_cache(maxsize=4)
def _runtime(model: str, plan_json: str) -> TorchRuntime:
    """Kept for the ClientApp process's life, so a GPU node keeps its inner AdamW state across tasks
    (DiLoCo). That is the node's life under the simulation engine; a SuperNode (``flwr run``)
    starts one process per message, so there the state goes through node_config ``state``."""
    return TorchRuntime(ModelSpec(model).gpt_config(), Plan.from_json(plan_json), default_device(),
                        keep_optimizer=True)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    task = Task.from_dict(json.loads(str(config["task"])))
    rt = _runtime(str(config["model"]), task.plan.to_json())
    rt.set_weights(msg.content["weights"].to_torch_state_dict())
    shard = _shard(str(context.node_config.get("data", "stdlib")))
    # A node folder (node_config "state") carries the AdamW moments from one ClientApp process
    # to the next; one file per plan, as the in-process cache keeps one runtime per plan.
    saved = Path(str(context.node_config["state"])) / f"optimizer-{task.plan.hash}.pt" \
        if "state" in context.node_config else None
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        if rt.optimizer is None:
            rt.load_optimizer(saved, task.train)
    result = rt.train(shard.batches(task.batch_size, task.seq_len, task.seed), task.steps, task.train,
                      task.step_offset)
    if saved is not None:
        rt.save_optimizer(saved)
    reply = RecordDict({"weights": ArrayRecord(torch_state_dict=rt.trained_weights()),
                        "result": ConfigRecord({"steps": result.steps, "tokens": result.tokens,
                                                "losses": result.losses})})
    return Message(content=reply, reply_to=msg)
