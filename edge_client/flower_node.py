"""The Flower node's side of the bridge: the ClientApp that declares the node's hardware (a query
message, once) and trains stamen tasks on a SuperNode (a train message per task).

Under ``flwr run`` a SuperNode starts a new ClientApp process for every message, so this module
imports only what training needs (not the HTTP client), and whatever must outlive one task
lives in the node's folder, node_config ``state``: the inner AdamW moments (DiLoCo keeps them
across tasks) and the node's text as one byte array, read once instead of once per task.
node_config ``threads`` caps torch's CPU threads: two nodes on one machine that each spawn a
thread per core wait on each other's spinning threads, and a task then takes many times longer.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from stamen.core.data import Shard, cached_corpus, load_corpus
from stamen.core.model import ModelSpec
from stamen.core.plan import Plan
from stamen.core.records import Task
from stamen.core.train import default_device
from stamen.edge_client.probe import capabilities, measure_flops, probe
from stamen.edge_client.runtime import TorchRuntime

log = logging.getLogger(__name__)


def log_to_stdout() -> None:
    """Send stamen's log lines (INFO and up) to stdout, where Flower picks up an app's output:
    ``flwr run --stream`` shows the ServerApp's, the SuperNode's terminal the ClientApp's."""
    root = logging.getLogger("stamen")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s stamen: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # a handler the libraries set on the root logger would repeat each line


@functools.lru_cache(maxsize=2)
def _shard(data: str, state: str | None) -> Shard:
    corpus = cached_corpus(data, Path(state)) if state else load_corpus(data)
    return Shard(corpus, corpus.doc_bounds)


@functools.lru_cache(maxsize=4)
def _runtime(model: str, plan_json: str) -> TorchRuntime:
    """Kept for the ClientApp process's life, so a GPU node keeps its inner AdamW state across tasks
    (DiLoCo). That is the node's life under the simulation engine; a SuperNode (``flwr run``)
    starts one process per message, so there the state goes through node_config ``state``."""
    return TorchRuntime(ModelSpec(model).gpt_config(), Plan.from_json(plan_json), default_device(),
                        keep_optimizer=True)


def _setup(context: Context) -> None:
    log_to_stdout()
    if "threads" in context.node_config:
        torch.set_num_threads(int(context.node_config["threads"]))


client_app = ClientApp()


@client_app.query()
def _capabilities(msg: Message, context: Context) -> Message:
    """What the node declares when the gateway joins the server on its behalf: its own memory,
    measured FLOP/s and accelerator, not the gateway's (the server cuts a task's steps to what
    the declared compute does within the deadline)."""
    _setup(context)
    caps = capabilities(probe(), "gpu", ("torch",), measure_flops(default_device()))
    log.info("capabilities: %.1f GFLOP/s, %.0f MiB, %s", caps.flops / 1e9, caps.memory_bytes / 2**20,
             caps.accelerator or "cpu")
    return Message(content=RecordDict({"capabilities": ConfigRecord({"json": json.dumps(caps.to_dict())})}),
                   reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    start = time.monotonic()
    _setup(context)
    node = context.node_config
    config = msg.content["config"]
    task = Task.from_dict(json.loads(str(config["task"])))
    rt = _runtime(str(config["model"]), task.plan.to_json())
    rt.set_weights(msg.content["weights"].to_torch_state_dict())
    state = str(node["state"]) if "state" in node else None
    shard = _shard(str(node.get("data", "stdlib")), state)
    # The AdamW moments go from one ClientApp process to the next through the node's folder;
    # one file per plan, as the in-process cache keeps one runtime per plan.
    saved = Path(state) / f"optimizer-{task.plan.hash}.pt" if state else None
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        if rt.optimizer is None:
            rt.load_optimizer(saved, task.train)
    ready = time.monotonic()
    result = rt.train(shard.batches(task.batch_size, task.seq_len, task.seed), task.steps, task.train,
                      task.step_offset)
    train_s = time.monotonic() - ready
    if saved is not None:
        rt.save_optimizer(saved)
    log.info("%s: %d steps in %.1f s (%.1f s to load), mean loss %.3f", task.task_id, result.steps, train_s,
             ready - start, result.mean_loss)
    reply = RecordDict({"weights": ArrayRecord(torch_state_dict=rt.trained_weights()),
                        "result": ConfigRecord({"steps": result.steps, "tokens": result.tokens,
                                                "losses": result.losses, "train_s": train_s})})
    return Message(content=reply, reply_to=msg)
