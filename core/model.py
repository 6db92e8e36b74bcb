"""The GPT family every stamen federation trains, and the ModelSpec that names it.

Written in the spirit of nanoGPT's model.py: pre-LayerNorm blocks, causal attention through
``scaled_dot_product_attention``, a GELU MLP, optional weight tying. Two departures, both for
submodels: the number of attention heads and the MLP hidden width are free parameters of the
config (a width-reduced plan keeps a prefix of heads and hidden units), and a model may be
built with only some of the global blocks (``block_ids`` keeps their global names, so a
submodel's state dict speaks the global model's tensor names).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from stamen.core.errors import UserError
from stamen.core.hf import build_hf, folder_hash, hf_folder, is_hf
from stamen.core.names import check_model_name
from stamen.core.presets import PRESETS, GPTConfig, gpt_param_count  # re-exported


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, n_head: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, cfg.head_dim
        inner = n_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)
        self.c_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, n_head: int, mlp_hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, n_head)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT, or a submodel of one: ``block_ids`` names which global blocks it holds and
    ``n_head``/``mlp_hidden`` may be a prefix of the config's."""

    def __init__(
        self,
        cfg: GPTConfig,
        block_ids: tuple[int, ...] | None = None,
        n_head: int | None = None,
        mlp_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_ids = tuple(range(cfg.n_layer)) if block_ids is None else tuple(block_ids)
        n_head = cfg.n_head if n_head is None else n_head
        mlp_hidden = cfg.mlp_hidden if mlp_hidden is None else mlp_hidden
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        # A ModuleDict keyed by the global block index keeps global tensor names in submodels.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, n_head, mlp_hidden) for i in self.block_ids})
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections, by the *global* depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output, what ``lm_head`` turns into logits (the batched
        simulator fuses that matmul with the loss)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks.values():
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position; with targets, also the mean cross-entropy (nats/token)."""
        logits = self.lm_head(self.hidden(idx))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


@dataclass(frozen=True)
class ModelSpec:
    """A named model configuration. ``name`` is a preset, a user factory ``"pkg.mod:fn"``
    (which returns an ``nn.Module``, or a ``GPTConfig`` to get stamen's GPT and its submodels),
    or ``"hf:PATH"``, a pretrained causal LM in Hugging Face's folder format (``core.hf``).
    The hash names checkpoints, plans and artifacts, so it must not depend on the process."""

    name: str

    def __post_init__(self) -> None:
        check_model_name(self.name)
        if is_hf(self.name):
            hf_folder(self.name)

    def _factory(self):
        mod_name, _, fn_name = self.name.partition(":")
        try:
            return getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot load model factory {self.name!r}: {e}") from None

    def gpt_config(self) -> GPTConfig | None:
        """The GPTConfig behind this spec, or None for a factory that builds its own module."""
        if self.name in PRESETS:
            return PRESETS[self.name]
        if is_hf(self.name):
            return None
        made = self._factory()()
        return made if isinstance(made, GPTConfig) else None

    def build(self, weights: bool = True) -> nn.Module:
        """The model; an ``hf:`` base with its pretrained weights (``weights=False``: its
        architecture on the meta device, for shapes and estimates)."""
        if is_hf(self.name):
            return build_hf(hf_folder(self.name), weights)
        cfg = self.gpt_config()
        with nullcontext() if weights else torch.device("meta"):
            return GPT(cfg) if cfg is not None else self._factory()()

    @property
    def hash(self) -> str:
        if is_hf(self.name):
            return folder_hash(hf_folder(self.name))
        cfg = self.gpt_config()
        ident = {"name": self.name, "config": asdict(cfg) if cfg is not None else None}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The canonical weight dict: parameter names as ``named_parameters`` gives them (a tied
    head appears once, as ``wte.weight``). Every manifest, update and checkpoint uses it."""
    return {n: p.detach() for n, p in model.named_parameters()}


@torch.no_grad()
def load_weights(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's parameters in place (names must match exactly)."""
    params = dict(model.named_parameters())
    missing, extra = set(params) - set(values), set(values) - set(params)
    if missing or extra:
        raise KeyError(f"weights do not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    for n, p in params.items():
        p.copy_(values[n])
