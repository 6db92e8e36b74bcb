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


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest context the position table holds
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    head_dim: int = 0  # 0 means n_embd // n_head
    mlp_hidden: int = 0  # 0 means 4 * n_embd
    bias: bool = True
    tie_weights: bool = True

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.mlp_hidden == 0:
            object.__setattr__(self, "mlp_hidden", 4 * self.n_embd)


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


def gpt_param_count(cfg: GPTConfig, n_layer: int | None = None, n_head: int | None = None,
                    mlp_hidden: int | None = None) -> int:
    """Closed-form parameter count (the test holds the module to it)."""
    L = cfg.n_layer if n_layer is None else n_layer
    a = (cfg.n_head if n_head is None else n_head) * cfg.head_dim
    m = cfg.mlp_hidden if mlp_hidden is None else mlp_hidden
    d, b = cfg.n_embd, int(cfg.bias)
    ln = d * (1 + b)
    block = 2 * ln + (3 * a * d + 3 * a * b) + (a * d + d * b) + (m * d + m * b) + (m * d + d * b)
    head = 0 if cfg.tie_weights else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.block_size * d + L * block + ln + head


PRESETS: dict[str, GPTConfig] = {
    # Trains on two CPU cores in minutes; the simulator's and the tests' workhorse.
    "gpt-tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=64),
    # nanoGPT's shakespeare-char shape, ~10.7M parameters.
    "gpt-small": GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=6, n_embd=384),
    # GPT-2 / GPT-3 shapes under their usual names. The vocabulary is the bytes tokenizer's 256
    # (the only tokenizer stamen's data speaks), so the counts sit below the names' (GPT-2's
    # 50,304-row embedding alone is 38.6M of gpt-125m's 124M).
    "gpt-125m": GPTConfig(vocab_size=256, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt-350m": GPTConfig(vocab_size=256, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt-1.3b": GPTConfig(vocab_size=256, block_size=2048, n_layer=24, n_head=32, n_embd=2048),
}


@dataclass(frozen=True)
class ModelSpec:
    """A named model configuration. ``name`` is a preset, a user factory ``"pkg.mod:fn"``
    (which returns an ``nn.Module``, or a ``GPTConfig`` to get stamen's GPT and its submodels),
    or ``"hf:PATH"``, a pretrained causal LM in Hugging Face's folder format (``core.hf``).
    The hash names checkpoints, plans and artifacts, so it must not depend on the process."""

    name: str

    def __post_init__(self) -> None:
        if is_hf(self.name):
            hf_folder(self.name)
        elif self.name not in PRESETS and ":" not in self.name:
            raise UserError(f"unknown model {self.name!r}: use one of {', '.join(PRESETS)}, 'pkg.module:function' or 'hf:PATH'")

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
