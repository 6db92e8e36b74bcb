"""Does upload compression cost model quality? (issue 4, acceptance 5)

The same small synchronous federation runs once per upload codec: several clients on IID
shards of the stdlib corpus train the full plan for H local steps from the current global
version (each keeps its own AdamW state across rounds, as Photon does), encode Δ = θ_global −
θ_local with the codec (and its error feedback, per client); the bytes are decoded with the
server's bounded limits and submitted to the REAL server aggregator with K = cohort and
τ_max = 0, which is exactly synchronous DiLoCo (outer Nesterov, lr 0.7, μ 0.9). Everything but the codec is the
same in every run (init, batches, schedule), so the final validation losses differ only by
what compression did. One JSON line per codec; targets: int8 within 1 % of fp32, top-k + EF
within 2 %.

``federated_run`` is the reusable piece (the simulator's codec comparisons call it).
Run: ``python bench/quality.py`` (~3 minutes on two shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field

import torch

from stamen.compression.codecs import decode, encode, nbytes_fp32
from stamen.compression.feedback import ErrorFeedback
from stamen.core.data import partition, stdlib_corpus
from stamen.core.model import GPT, ModelSpec, load_weights, weights
from stamen.core.plan import full_plan
from stamen.core.records import Update
from stamen.core.train import TrainConfig, evaluate, make_optimizer, train_steps
from stamen.core.wire import Limits
from stamen.server.aggregator import Aggregator, AggregatorConfig
from stamen.server.outer import OuterConfig

RUNS = [("fp32", False), ("int8(block=256)+zstd(1)", False), ("topk(0.02)+int4+zstd(1)", True)]


@dataclass(frozen=True)
class FederationSetup:
    model: str = "gpt-tiny"
    clients: int = 4
    rounds: int = 30
    local_steps: int = 10
    batch_size: int = 8
    seq_len: int = 64
    val_batches: int = 16
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, warmup_steps=20, total_steps=300))
    outer: OuterConfig = field(default_factory=OuterConfig)


@dataclass(frozen=True)
class RunResult:
    codec: str
    ef: bool
    val_loss: float
    upload_bytes: int
    ratio_vs_fp32: float
    rounds: int


def federated_run(setup: FederationSetup, codec: str, error_feedback: bool) -> RunResult:
    """One synchronous federated run whose uploads go through ``codec``; see the module doc."""
    cfg = ModelSpec(setup.model).gpt_config()
    torch.manual_seed(setup.seed)
    start = weights(GPT(cfg))
    train, val = stdlib_corpus().split()
    shards = partition(train, setup.clients, "iid", setup.seed)
    val_set = val.fixed_batches(setup.val_batches, setup.batch_size, setup.seq_len, setup.seed)
    plan = full_plan(cfg)
    agg = Aggregator(cfg, start, AggregatorConfig(buffer_k=setup.clients, tau_max=0, outer=setup.outer))
    limits = Limits(manifest={n: tuple(t.shape) for n, t in plan.extract(start, cfg).items()})
    models = [GPT(cfg) for _ in range(setup.clients)]
    optimizers = [make_optimizer(m, setup.train) for m in models]
    streams = [s.batches(setup.batch_size, setup.seq_len, seed=setup.seed + 1 + i) for i, s in enumerate(shards)]
    feedbacks = [ErrorFeedback() for _ in models]
    sent = raw = 0
    for r in range(setup.rounds):
        base = plan.extract(agg.weights, cfg)
        for i, model in enumerate(models):
            load_weights(model, base)
            result = train_steps(model, streams[i], setup.local_steps, setup.train, optimizers[i],
                                 step_offset=r * setup.local_steps)
            delta = {n: base[n] - t for n, t in weights(model).items()}
            data = (feedbacks[i].encode(plan.hash, delta, codec) if error_feedback else encode(delta, codec))
            sent, raw = sent + len(data), raw + nbytes_fp32(delta)
            agg.submit(Update(f"r{r}-c{i}", agg.version, plan, decode(data, limits).tensors, result.tokens), now=float(r))
    final = GPT(cfg)
    load_weights(final, agg.weights)
    return RunResult(codec, error_feedback, evaluate(final, val_set), sent, raw / sent, agg.version)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    # One intra-op thread: on two shared cores torch's pool of two stalls whenever the other
    # core is busy (a gpt-tiny step measured 1.16 s with two threads, 0.04 s with one).
    torch.set_num_threads(1)
    total = a.rounds * a.local_steps
    setup = FederationSetup(a.model, a.clients, a.rounds, a.local_steps, seed=a.seed,
                            train=TrainConfig(lr=3e-3, warmup_steps=max(1, total // 15), total_steps=total))
    print(json.dumps({"setup": {k: v for k, v in asdict(setup).items() if k not in ("train", "outer")}}), flush=True)
    baseline = None
    for codec, ef in RUNS:
        res = federated_run(setup, codec, ef)
        baseline = res.val_loss if baseline is None else baseline
        line = asdict(res) | {"val_loss": round(res.val_loss, 4), "ratio_vs_fp32": round(res.ratio_vs_fp32, 2),
                              "loss_vs_fp32_pct": round(100 * (res.val_loss / baseline - 1), 2)}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
