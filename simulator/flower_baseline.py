"""The reference the simulator is measured against: Flower's simulation engine (Ray backend)
doing exactly the local training the batched simulator does, for the same devices.

A ``Workload`` names that training (model, tier plan, steps, batch, data partition, seed) and
rebuilds it identically in any process: the bench's own, and each Ray actor that runs the
Flower ClientApp. The ClientApp trains device ``i`` with ``core.train.train_steps`` on shard
``i`` with batch seed ``i`` and replies with Δ = θ_base − θ_local, as a stamen device would.
It lives in the package (not in bench/) so Ray actors import it by name.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from stamen.core.data import Shard, partition, stdlib_corpus
from stamen.core.model import GPT, GPTConfig, ModelSpec, load_weights, weights
from stamen.core.plan import Plan, tier_plans
from stamen.core.train import TrainConfig, train_steps


@dataclass(frozen=True)
class Workload:
    """The phone workload of the simulator bench: every device trains ``tier``'s plan of
    ``model`` for ``steps`` steps of ``batch_size`` x ``seq_len`` tokens on its own shard."""

    model: str = "gpt-tiny"
    tier: str = "phone-low"
    devices: int = 1000
    steps: int = 4
    batch_size: int = 4
    seq_len: int = 64
    partition: str = "natural"
    seed: int = 0

    @property
    def gpt_config(self) -> GPTConfig:
        return ModelSpec(self.model).gpt_config()

    @property
    def plan(self) -> Plan:
        return tier_plans(self.gpt_config)[self.tier]

    @property
    def train(self) -> TrainConfig:
        return TrainConfig()

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The plan's slice of a global model initialised from ``seed``."""
        torch.manual_seed(self.seed)
        return self.plan.extract(weights(GPT(self.gpt_config)), self.gpt_config)

    def submodel(self, base: dict[str, torch.Tensor]) -> GPT:
        model = self.plan.build(self.gpt_config)
        load_weights(model, base)
        return model

    def shards(self) -> list[Shard]:
        return _shards(self.devices, self.partition, self.seed, self.seq_len)

    def batches(self, device: int):
        return self.shards()[device].batches(self.batch_size, self.seq_len, seed=device)

    def flops_per_update(self) -> float:
        cost = self.plan.cost(self.gpt_config, self.batch_size, self.seq_len)
        return cost.flops_per_token * self.steps * self.batch_size * self.seq_len


@functools.lru_cache(maxsize=4)
def _shards(devices: int, how: str, seed: int, seq_len: int) -> list[Shard]:
    """Loaded once per process: a Ray actor pays for the corpus once, not per message."""
    train, _ = stdlib_corpus().split()
    return partition(train, devices, how, seed, seq_len=seq_len)


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    work = Workload(**{k: config[k] for k in Workload.__dataclass_fields__})
    base = msg.content["weights"].to_torch_state_dict()
    model = work.submodel(base)
    result = train_steps(model, work.batches(int(config["device"])), work.steps, work.train)
    trained = weights(model)
    delta = {n: base[n] - trained[n] for n in work.plan.trainable(work.gpt_config)}
    reply = RecordDict({"delta": ArrayRecord(torch_state_dict=delta),
                        "metrics": MetricRecord({"tokens": result.tokens, "loss": result.final_loss})})
    return Message(content=reply, reply_to=msg)


def run_flower(work: Workload, devices: list[int], warmup: int) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """Run Flower's simulation engine: first ``warmup`` devices once (Ray start-up, corpus load
    in every actor), then time one round over ``devices``. Returns (updates per wall-second of
    the timed round, the deltas of that round in ``devices`` order)."""
    base = work.base_weights()
    n_nodes = max(devices) + 1
    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        while len(nodes := sorted(grid.get_node_ids())) < n_nodes:  # nodes register in the background
            time.sleep(0.1)

        def send(group: list[int]) -> list[Message]:
            msgs = [Message(content=RecordDict({"weights": ArrayRecord(torch_state_dict=base),
                                                "config": ConfigRecord({**asdict(work), "device": d})}),
                            dst_node_id=nodes[d], message_type="train") for d in group]
            replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs)}
            return [replies[nodes[d]] for d in group]

        send(devices[:warmup])
        start = time.perf_counter()
        replies = send(devices)
        out["seconds"] = time.perf_counter() - start
        out["deltas"] = [r.content["delta"].to_torch_state_dict() for r in replies]

    run_simulation(server_app, client_app, num_supernodes=n_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return len(devices) / out["seconds"], out["deltas"]
