"""Codec figures on real pseudo-gradients (issue 4, acceptance 4).

gpt-small trains on the stdlib corpus from a shared start (a few warm-up steps from a seeded
init); then, round after round, a client trains H more steps and uploads its pseudo-gradient
Δ = θ_before − θ_after, as a federated client would. Every codec encodes the same Δs (codecs
marked "+ef" carry their error-feedback residual from round to round) and prints one JSON line:

  codec, ef, ratio_vs_fp32 (total fp32 bytes / total payload bytes), rel_l2_error (mean over
  rounds of ‖decoded − Δ‖ / ‖Δ‖), sum_rel_l2_error (the same for the sum over rounds, which is
  what error feedback protects), encode_mb_s / decode_mb_s (MB of fp32 input per second, best
  round).

A last line is the floor measured in the same run on the same bytes: a raw memcpy and zstd-1.
Targets: int8(block=256)+zstd ≥ 3.9× at ≤ 1 % error; topk(0.02)+int4+zstd with error feedback
≥ 64×; dense codecs ≥ 500 MB/s both ways. Run: ``python bench/compression.py`` (~2 minutes on
two shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import zstandard

from stamen.compression.codecs import decode, encode, nbytes_fp32
from stamen.compression.feedback import ErrorFeedback
from stamen.core.data import stdlib_corpus
from stamen.core.model import ModelSpec, weights
from stamen.core.train import TrainConfig, train_steps

CODECS = [
    ("fp32", False), ("fp16", False), ("bf16+zstd(1)", False),
    ("int8(block=256)", False), ("int8(block=256)+zstd(1)", False), ("int8(block=256)+zstd(3)", False),
    ("int4(block=64)+zstd(1)", False), ("int4(block=256)+zstd(1)", False),
    ("topk(0.02)+int4+zstd(1)", False), ("topk(0.02)+int4+zstd(1)", True),
    ("topk(0.02, select=sample)+int4+zstd(1)", True), ("topk(0.01)+int4+zstd(1)", True),
]


def pseudo_gradients(model: str, rounds: int, steps: int, warmup: int, batch_size: int, seq_len: int,
                     seed: int) -> list[dict[str, torch.Tensor]]:
    """Successive pseudo-gradients of one client that keeps training from a shared start."""
    torch.manual_seed(seed)
    net = ModelSpec(model).build()
    train, _ = stdlib_corpus().split()
    batches = train.batches(batch_size, seq_len, seed=seed)
    cfg = TrainConfig(lr=1e-3, warmup_steps=warmup, total_steps=warmup + rounds * steps)
    train_steps(net, batches, warmup, cfg)
    deltas = []
    for r in range(rounds):
        before = {n: t.clone() for n, t in weights(net).items()}
        train_steps(net, batches, steps, cfg, step_offset=warmup + r * steps)
        deltas.append({n: before[n] - t for n, t in weights(net).items()})
    return deltas


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n].float() - b[n]).pow(2).sum()) for n in b)
    return (num / sum(float(t.pow(2).sum()) for t in b.values())) ** 0.5


def measure(spec: str, ef: bool, deltas: list[dict[str, torch.Tensor]]) -> dict:
    feedback = ErrorFeedback()
    enc_best = dec_best = float("inf")
    errors, sent = [], 0
    true_sum = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    seen_sum = {n: torch.zeros_like(t) for n, t in deltas[0].items()}
    for delta in deltas:
        t0 = time.perf_counter()
        data = feedback.encode("bench", delta, spec) if ef else encode(delta, spec)
        t1 = time.perf_counter()
        out = decode(data).tensors
        t2 = time.perf_counter()
        enc_best, dec_best = min(enc_best, t1 - t0), min(dec_best, t2 - t1)
        sent += len(data)
        errors.append(_rel(out, delta))
        for n in delta:
            true_sum[n] += delta[n]
            seen_sum[n] += out[n]
    raw = nbytes_fp32(deltas[0])
    return {"codec": spec, "ef": ef, "ratio_vs_fp32": round(raw * len(deltas) / sent, 2),
            "rel_l2_error": round(float(np.mean(errors)), 5), "sum_rel_l2_error": round(_rel(seen_sum, true_sum), 5),
            "encode_mb_s": round(raw / enc_best / 1e6, 1), "decode_mb_s": round(raw / dec_best / 1e6, 1)}


def floor(delta: dict[str, torch.Tensor], repeats: int = 3) -> dict:
    """Raw memcpy and zstd-1 over the same fp32 bytes, best of ``repeats``."""
    flat = np.concatenate([t.reshape(-1).numpy() for t in delta.values()])
    best = {"memcpy": float("inf"), "zstd1_encode": float("inf"), "zstd1_decode": float("inf")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        flat.copy()
        t1 = time.perf_counter()
        packed = zstandard.ZstdCompressor(level=1).compress(flat)
        t2 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(packed)
        t3 = time.perf_counter()
        for key, dt in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
            best[key] = min(best[key], dt)
    return {"floor": True, "memcpy_mb_s": round(flat.nbytes / best["memcpy"] / 1e6, 1),
            "zstd1_encode_mb_s": round(flat.nbytes / best["zstd1_encode"] / 1e6, 1),
            "zstd1_decode_mb_s": round(flat.nbytes / best["zstd1_decode"] / 1e6, 1),
            "zstd1_ratio": round(flat.nbytes / len(packed), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt-small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="local steps per round (H)")
    p.add_argument("--warmup", type=int, default=6, help="steps to the shared start")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    # One intra-op thread: on two shared cores torch's pool of two stalls whenever the other
    # core is busy (a gpt-tiny step measured 1.16 s with two threads, 0.04 s with one).
    torch.set_num_threads(1)
    deltas = pseudo_gradients(a.model, a.rounds, a.steps, a.warmup, a.batch_size, a.seq_len, a.seed)
    print(json.dumps({"model": a.model, "params": nbytes_fp32(deltas[0]) // 4, "rounds": a.rounds,
                      "steps_per_round": a.steps}), flush=True)
    for spec, ef in CODECS:
        print(json.dumps(measure(spec, ef, deltas)), flush=True)
    print(json.dumps(floor(deltas[0])), flush=True)


if __name__ == "__main__":
    main()
