"""Sampling text from a byte-level language model (nanoGPT's ``generate``, seeded)."""

from __future__ import annotations

import torch
import torch.nn as nn

from stamen.core.data import decode
from stamen.core.errors import UserError


@torch.no_grad()
def generate(model: nn.Module, prompt: str, max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0, block_size: int | None = None) -> str:
    """The prompt's continuation (bytes decoded as UTF-8, broken sequences replaced).
    Temperature 0 is greedy. The same seed gives the same text."""
    if max_new_tokens < 0:
        raise UserError(f"max new tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    ids = list(prompt.encode("utf-8")) or [ord("\n")]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long)
    start = idx.shape[1]
    for _ in range(max_new_tokens):
        ctx = idx if block_size is None else idx[:, -block_size:]
        logits = model(ctx)[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    return decode(idx[0, start:].tolist())
