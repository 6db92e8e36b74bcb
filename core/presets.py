"""The GPT family's shapes: its config, the presets by name, and their closed-form parameter
count. Nothing here needs torch (``core.model`` builds the modules), so the CLI can check a
model's name before it loads torch (``core.names``)."""

from __future__ import annotations

from dataclasses import dataclass

from stamen.core.errors import UserError


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

