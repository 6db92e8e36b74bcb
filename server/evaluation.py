"""Evaluation as a step of the federation: the server scores published versions on held-out
text it was given, so the operator sees what the federation learned (Flower's evaluate round,
done centrally: clients' text never has to leave them for it).

The held-out set is fixed for the server's life (the same batches score every version, so the
numbers compare), drawn with a fixed seed from ``--eval-data``: by default the built-in corpus's
validation split (whole files the training partitions never hold), else every document of the
given source. A LoRA federation scores its adapter over the frozen base on held-out
*instructions* (the loss on the response, as clients train): ``stdlib``, the built-in
instruction set's validation split, which clients never train on, or every example of a JSONL
file, in the base's own tokens. Scoring is ``core.train.evaluate``, the one the baseline and the
simulator use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

import torch.nn as nn

from stamen.core.data import Shard, load_corpus, stdlib_corpus
from stamen.core.hf import IGNORE
from stamen.core.instruct import base_encoding, load_instructions
from stamen.core.lora import LoraPlan, LoraSpace, load_adapter
from stamen.core.model import GPT, GPTConfig, ModelSpec, load_weights
from stamen.core.train import evaluate

EVAL_SEED = 1  # the baseline's validation batches use seed + 1 = 1 for seed 0


@dataclass(frozen=True)
class Evaluation:
    version: int
    val_loss: float  # mean cross-entropy, nats/token (a byte, or a token of the base's tokenizer)
    tokens: int  # held-out tokens scored (a LoRA federation: response tokens)
    wall_s: float
    at: float  # unix time


class Evaluator:
    """A model and a fixed held-out set; ``score(version, weights)`` is pure up to timing."""

    def __init__(self, model: nn.Module, batches: list, source: str,
                 load: Callable[[nn.Module, dict[str, torch.Tensor]], None] = load_weights) -> None:
        self.model, self.batches, self.source, self.load = model.eval(), batches, source, load
        self.tokens = sum(int((y != IGNORE).sum()) for _, y in batches)

    @classmethod
    def text(cls, cfg: GPTConfig, source: str, n_batches: int, batch_size: int, seq_len: int) -> "Evaluator":
        """A GPT federation's: held-out text."""
        corpus = stdlib_corpus(validation_only=True) if source == "stdlib" else load_corpus(source)
        batches = Shard(corpus, corpus.doc_bounds).fixed_batches(n_batches, batch_size, seq_len, seed=EVAL_SEED)
        return cls(GPT(cfg), batches, source)

    @classmethod
    def instructions(cls, spec: ModelSpec, space: LoraSpace, source: str, n_batches: int, batch_size: int,
                     seq_len: int) -> "Evaluator":
        """A LoRA federation's: the whole-rank adapter over the base (fp32), on held-out
        instructions in the base's tokens. Refused at once if no prompt leaves room for its
        response within ``seq_len`` (the set would score nothing, as clients would train nothing)."""
        examples = load_instructions(source)
        if source == "stdlib":
            examples = examples.split()[1]
        encode, eos = base_encoding(spec.name)
        examples.check_fits(seq_len, encode)
        batches = examples.fixed_batches(n_batches, batch_size, seq_len, EVAL_SEED, encode, eos)
        return cls(LoraPlan("evaluation", space.r_max).build(spec.build(), space), batches, source, load_adapter)

    def score(self, version: int, weights: dict[str, torch.Tensor]) -> Evaluation:
        return self.prepare(version, weights)()

    def prepare(self, version: int, weights: dict[str, torch.Tensor]) -> Callable[[], Evaluation]:
        """Copy ``weights`` into the evaluator's own model now, and return the scoring of them,
        to run later on any thread: the caller may change ``weights`` meanwhile (the server
        keeps publishing while a worker scores). One scoring at a time per evaluator."""
        start = time.perf_counter()
        self.load(self.model, weights)

        def run() -> Evaluation:
            loss = evaluate(self.model, self.batches)
            return Evaluation(version, loss, self.tokens, time.perf_counter() - start, time.time())

        return run
