"""Evaluation as a step of the federation: the server scores published versions on held-out
text it was given, so the operator sees what the federation learned (Flower's evaluate round,
done centrally: clients' text never has to leave them for it).

The held-out set is fixed for the server's life (the same batches score every version, so the
numbers compare), drawn with a fixed seed from ``--eval-data``: by default the built-in corpus's
validation split (whole files the training partitions never hold), else every document of the
given source. Scoring is ``core.train.evaluate``, the one the baseline and the simulator use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from stamen.core.data import Shard, load_corpus, stdlib_corpus
from stamen.core.model import GPT, GPTConfig, load_weights
from stamen.core.train import evaluate

EVAL_SEED = 1  # the baseline's validation batches use seed + 1 = 1 for seed 0


@dataclass(frozen=True)
class Evaluation:
    version: int
    val_loss: float  # mean cross-entropy, nats/token (byte)
    tokens: int  # held-out tokens scored
    wall_s: float
    at: float  # unix time


class Evaluator:
    """A model and a fixed held-out set; ``score(version, weights)`` is pure up to timing."""

    def __init__(self, cfg: GPTConfig, source: str, n_batches: int, batch_size: int, seq_len: int) -> None:
        corpus = stdlib_corpus(validation_only=True) if source == "stdlib" else load_corpus(source)
        self.source = source
        self.batches = Shard(corpus, corpus.doc_bounds).fixed_batches(n_batches, batch_size, seq_len, seed=EVAL_SEED)
        self.tokens = n_batches * batch_size * seq_len
        self.model = GPT(cfg).eval()

    def score(self, version: int, weights: dict[str, torch.Tensor]) -> Evaluation:
        return self.prepare(version, weights)()

    def prepare(self, version: int, weights: dict[str, torch.Tensor]) -> Callable[[], Evaluation]:
        """Copy ``weights`` into the evaluator's own model now, and return the scoring of them,
        to run later on any thread: the caller may change ``weights`` meanwhile (the server
        keeps publishing while a worker scores). One scoring at a time per evaluator."""
        start = time.perf_counter()
        load_weights(self.model, weights)

        def run() -> Evaluation:
            loss = evaluate(self.model, self.batches)
            return Evaluation(version, loss, self.tokens, time.perf_counter() - start, time.time())

        return run
