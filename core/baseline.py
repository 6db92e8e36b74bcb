"""Centralized training of a model on a corpus for a token budget: the reference that every
federated run is compared with (same model, same data, same tokens)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stamen.core.data import load_corpus
from stamen.core.errors import UserError
from stamen.core.gpt2 import save_model
from stamen.core.model import ModelSpec, weights
from stamen.core.train import TrainConfig, default_device, evaluate, make_optimizer, train_steps


@dataclass(frozen=True)
class BaselineConfig:
    model: str = "gpt-tiny"
    data: str = "stdlib"
    tokens: int = 2_000_000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    eval_every: int = 50  # steps
    eval_batches: int = 16
    seed: int = 0


def run_baseline(cfg: BaselineConfig, out: Path, progress: bool = True,
                 domains: dict[str, list] | None = None) -> dict:
    """Train, validate periodically, and write ``summary.json``, ``loss.png`` and the final
    weights (``model/``, a folder ``stamen generate`` and ``transformers`` load) into ``out``.
    ``domains``: more fixed validation batches by name (a simulation's public and private
    held-out text), whose final losses the summary gives as ``final_by_domain``."""
    if cfg.tokens <= 0:
        raise UserError(f"--tokens must be positive, got {cfg.tokens}")
    spec = ModelSpec(cfg.model)
    corpus = load_corpus(cfg.data)
    train_shard, val_shard = corpus.split()
    torch.manual_seed(cfg.seed)
    device = default_device()
    model = spec.build().to(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = max(1, cfg.tokens // tokens_per_step)
    tcfg = TrainConfig(lr=cfg.lr, total_steps=steps, warmup_steps=min(100, steps // 10 + 1))
    opt = make_optimizer(model, tcfg)
    batches = train_shard.batches(cfg.batch_size, cfg.seq_len, cfg.seed)
    val = val_shard.fixed_batches(cfg.eval_batches, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1)

    out.mkdir(parents=True, exist_ok=True)
    curve = [[0, evaluate(model, val)]]
    train_curve = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=f"baseline {cfg.model}", unit="step", disable=not progress)
    done = 0
    while done < steps:
        n = min(cfg.eval_every, steps - done)
        res = train_steps(model, batches, n, tcfg, optimizer=opt, step_offset=done,
                          on_step=lambda i, loss: bar.update(1))
        done += n
        train_curve.append([done * tokens_per_step, res.mean_loss])
        curve.append([done * tokens_per_step, evaluate(model, val)])
        bar.set_postfix(val_loss=f"{curve[-1][1]:.3f}")
    bar.close()
    summary = {
        "model": cfg.model,
        "data": cfg.data,
        "tokens": steps * tokens_per_step,
        "final_val_loss": curve[-1][1],
        "val_curve": curve,
        "train_curve": train_curve,
        "unigram_entropy": val_shard.unigram_entropy(),
        "wall_s": time.perf_counter() - t0,
        "seed": cfg.seed,
    }
    if domains:
        summary["final_by_domain"] = {name: evaluate(model, batches) for name, batches in domains.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_model(spec, weights(model), out / "model", extra={"tokens": summary["tokens"]})
    plot_loss(summary, out / "loss.png")
    return summary


def plot_loss(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    vt, vl = zip(*summary["val_curve"])
    ax.plot(vt, vl, marker="o", ms=3, label="validation")
    if summary["train_curve"]:
        tt, tl = zip(*summary["train_curve"])
        ax.plot(tt, tl, alpha=0.6, label="training (mean over interval)")
    ax.axhline(summary["unigram_entropy"], color="grey", ls="--", label="byte-unigram entropy")
    ax.set(xlabel="tokens", ylabel="loss (nats/byte)",
           title=f"Centralized baseline: {summary['model']} on {summary['data']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
